"""vlcluster: multimodal model-merging research pipelines on local machines and clusters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlcluster.model.multiway import MultiwayTransformer


def load_model(path: Any, device: Any = "cpu") -> MultiwayTransformer:
    """A trained model from a stage directory, a converted directory or ``checkpoints/step_N``
    (local or s3://), in eval mode: ``encode_image``, ``encode_text``, ``fuse``, heads."""
    from vlcluster.model.load import load_model as load  # torch only when asked for

    return load(path, device)
