"""RegMean (Jin et al. 2023) for multiway experts.

For a linear layer y = x Wᵀ (torch's W is [out, in]) whose expert m saw
inputs X_m, the merged weight minimising Σ_m ‖X_m W_mᵀ − X_m Wᵀ‖² is

    Wᵀ = (Σ_m G̃_m)⁻¹ Σ_m G̃_m W_mᵀ,   G_m = X_mᵀ X_m / n_m,
    G̃_m = γ·G_m + (1−γ)·diag(G_m)      (γ scales the off-diagonal),

solved in float64. Everything that is not a linear weight (biases,
LayerNorm) is the plain mean of the experts.
"""

from __future__ import annotations

from typing import Any

import torch

from vlcluster.merge.methods import Group, register

LINEAR_WEIGHTS = frozenset({"qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"})


def needs_gram(part: str, rest: str) -> bool:
    return part in ("attn", "ffn") and rest in LINEAR_WEIGHTS


def regularised_gram(gram: torch.Tensor, gamma: float) -> torch.Tensor:
    return gamma * gram + (1 - gamma) * torch.diag(torch.diagonal(gram))


@register("regmean")
def regmean(group: Group, gamma: float, **_: Any) -> torch.Tensor:
    info = group.info
    if not needs_gram(info.part, info.rest):
        return torch.stack([w.double() for w in group.experts.values()]).mean(dim=0)
    missing = [info.key(expert) for expert in group.experts if expert not in group.grams]
    if missing:
        raise ValueError(f"RegMean: no Gram matrix for {', '.join(missing)} (did the grams stage run every route?)")
    grams = {expert: regularised_gram(group.grams[expert].double(), gamma) for expert in group.experts}
    lhs = sum(grams.values())
    rhs = sum(group.experts[expert].double() @ grams[expert] for expert in group.experts)  # Σ W_m G̃_m, [out, in]
    # W Σ G̃ = Σ W_m G̃_m; Σ G̃ is symmetric, so solve (Σ G̃) Wᵀ = (Σ W_m G̃_m)ᵀ.
    return torch.linalg.solve(lhs, rhs.T).T
