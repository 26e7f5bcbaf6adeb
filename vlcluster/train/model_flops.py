"""Model FLOPs of one training sample, from the layer shapes and the routes
each objective runs.

Counted: every matrix multiplication, at 2*m*n*k FLOPs for an [m, k] x [k, n]
product (a multiply and an add per term): the patch embedding (a matmul over
3*p*p inputs per patch), per transformer layer the QKV and output
projections, the attention scores QK^T and the weighted sum AV (the L^2
terms, at full length: padding is masked, not skipped, by the kernels), the
two MLP matrices, and the heads. Not counted: norms, activations, softmax,
residual adds and embedding look-ups (a few percent at most, and the usual
convention for MFU). Forward + backward = 3 x forward (the backward pass
computes the gradients of the inputs and of the weights, one matmul each).

Routes per sample (B = N - M bottom layers, M = vl_layers, Li image tokens,
Lt text tokens) as ``Objective`` runs them:

- always: the image embedding and its bottom pass (B layers at Li), shared;
- ITC (and ITM, which mines its negatives from ITC): the text bottom pass
  (B at Lt), both unimodal top passes (M at Li, M at Lt), the two
  projections and the similarity logits against the global batch in both
  directions (ITM samples its hard negatives from them);
- ITM: three fusion passes (M at Li+Lt: the positive pair, the hard-negative
  caption, the hard-negative image), three pooler+classifier heads;
- MLM: the masked caption's own bottom pass (B at Lt), one fusion pass,
  the MLM head on the masked tokens;
- VQA: the question's bottom pass (B at Lq), one fusion pass, the VQA head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `plan` counts FLOPs without importing the model (and torch)
    from vlcluster.model.config import ModelConfig

TRAIN_FACTOR = 3  # forward + backward (2x forward)


def matmul(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def layer_forward(config: ModelConfig, tokens: int) -> int:
    """One transformer block over one sequence of ``tokens``."""
    d, h = config.dim, config.mlp_dim
    projections = matmul(tokens, 3 * d, d) + matmul(tokens, d, d)
    attention = matmul(tokens, tokens, d) + matmul(tokens, d, tokens)  # QK^T and AV, summed over heads
    mlp = matmul(tokens, h, d) + matmul(tokens, d, h)
    return projections + attention + mlp


def layers_forward(config: ModelConfig, count: int, tokens: int) -> int:
    return count * layer_forward(config, tokens)


@dataclass(frozen=True)
class StepShape:
    """What the FLOPs of one sample depend on besides the model."""

    text_len: int  # padded caption length of the batch
    rank_batch: int  # samples this rank's objective sees at once (a micro-batch)
    global_batch: int  # samples ITC's negatives are gathered from (all ranks' micro-batches)
    masked_tokens: float = 0.0  # MLM positions per sample (expected)
    question_len: int = 0


@dataclass(frozen=True)
class Objectives:
    itc: bool
    itm: bool
    mlm: bool
    vqa: bool

    @classmethod
    def from_weights(cls, weights) -> Objectives:
        return cls(weights.itc > 0, weights.itm > 0, weights.mlm > 0, weights.vqa > 0)


def image_tokens(config: ModelConfig) -> int:
    return config.num_patches + 1


def forward_breakdown(config: ModelConfig, objectives: Objectives, shape: StepShape) -> dict[str, int | float]:
    """Forward FLOPs of one sample, by route."""
    d, bottom, top = config.dim, config.bottom_layers, config.vl_layers
    li, lt = image_tokens(config), shape.text_len
    patch = config.patch_size
    out: dict[str, int | float] = {
        "image_embedding": matmul(config.num_patches, d, 3 * patch * patch),
        "image_bottom": layers_forward(config, bottom, li),
    }
    if objectives.itc or objectives.itm:
        logits = 2 * matmul(1, shape.global_batch, config.itc_dim)  # ITM mines its negatives from these same logits
        out["itc"] = (
            layers_forward(config, bottom, lt)
            + layers_forward(config, top, li) + layers_forward(config, top, lt)
            + 2 * matmul(1, config.itc_dim, d) + logits
        )
    if objectives.itm:
        head = matmul(1, d, d) + matmul(1, 2, d)
        out["itm"] = 3 * (layers_forward(config, top, li + lt) + head)
    if objectives.mlm:
        head = matmul(1, d, d) + matmul(1, config.vocab_size, d)
        out["mlm"] = layers_forward(config, bottom, lt) + layers_forward(config, top, li + lt) + shape.masked_tokens * head
    if objectives.vqa:
        lq = shape.question_len
        head = matmul(1, 2 * d, d) + matmul(1, config.num_answers, 2 * d)
        out["vqa"] = layers_forward(config, bottom, lq) + layers_forward(config, top, li + lq) + head
    return out


def train_flops_per_sample(config: ModelConfig, objectives: Objectives, shape: StepShape) -> float:
    """Forward + backward model FLOPs of one sample."""
    return TRAIN_FACTOR * float(sum(forward_breakdown(config, objectives, shape).values()))


def tokens_per_sample(config: ModelConfig, shape: StepShape) -> int:
    """Input tokens of one sample: image patches + [CLS], caption (padded), question."""
    return image_tokens(config) + shape.text_len + shape.question_len
