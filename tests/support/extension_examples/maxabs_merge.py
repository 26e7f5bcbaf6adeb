"""Max-magnitude merge: each entry of the shared weight is the expert entry
with the largest magnitude (the worked example of docs/extending: one
registered function plus one line in ``merge/methods.py`` SPECS)."""

from __future__ import annotations

from typing import Any

import torch

from vlcluster.merge.methods import Group, register


@register("maxabs")
def maxabs(group: Group, **_: Any) -> torch.Tensor:
    stacked = torch.stack(list(group.experts.values()))
    return stacked.gather(0, stacked.abs().argmax(dim=0, keepdim=True)).squeeze(0)
