"""The ``merge`` stage: one modality-specific model merged into an agnostic one
(:func:`vlcluster.merge.apply.merge_checkpoint`), behind the mergeability gate
when the spec sets one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from vlcluster.jobspec.models import StageBase, Strict
from vlcluster.jobspec.references import Reference, model_reference
from vlcluster.merge.methods import METHOD_NAMES, PARAMS, SPECS
from vlcluster.metrics import METRICS
from vlcluster.stages.outputs import finish_stage
from vlcluster.storage.paths import local_copy

if TYPE_CHECKING:
    from vlcluster.stages.context import StageContext

log = logging.getLogger("vlcluster.merge")


def merge_param(name: str, default: Any = ...) -> Any:
    """A merge stage field from its declaration in :data:`vlcluster.merge.methods.PARAMS`."""
    param = PARAMS[name]
    bounds: dict[str, Any] = {"allow_inf_nan": False} if param.type in (float, dict) else {}
    if param.low is not None:
        bounds["gt" if param.low_open else "ge"] = param.low
    if param.high is not None:
        bounds["lt" if param.high_open else "le"] = param.high
    users = ", ".join(method for method, spec in SPECS.items() if name in spec.params)
    return Field(param.default if default is ... else default, description=f"{param.help} ({users})", **bounds)


class PartAlpha(Strict):
    """Per-part α overrides for interpolation sweeps (unset parts use ``alpha``)."""

    attn: float | None = merge_param("part_alpha", None)
    ffn: float | None = merge_param("part_alpha", None)
    ln: float | None = merge_param("part_alpha", None)


MergeMetric = Literal[METRICS]


class GateSpec(Strict):
    """Stop the pipeline before merging (and fine-tuning) an unmergeable model."""

    metric: MergeMetric = "tssd"
    max: float = Field(description="largest overall value of `metric` that may be merged")


class MergeStage(StageBase):
    kind: Literal["merge"]
    source: str = Field(description="stage holding the modality-specific checkpoint")
    seed: str | None = Field(None, description="stage holding W0 (arithmetic, ties, dare)")
    grams: str | None = Field(None, description="grams stage (regmean)")
    method: Literal[METHOD_NAMES] = "interpolation"
    alpha: float = merge_param("alpha")
    part_alpha: PartAlpha | None = Field(None, description="per-part alpha (interpolation)")
    lam: float = merge_param("lam")
    gamma: float = merge_param("gamma")
    density: float = merge_param("density")
    random_seed: int = merge_param("random_seed")
    gate: GateSpec | None = None

    @model_validator(mode="after")
    def _inputs_for_method(self) -> MergeStage:
        spec = SPECS[self.method]
        if spec.needs_base and self.seed is None:
            raise ValueError(f"method {self.method} needs 'seed' (the stage holding W0)")
        if spec.needs_grams and self.grams is None:
            raise ValueError(f"method {self.method} needs 'grams' (a grams stage)")
        return self

    def method_values(self) -> dict:
        """The chosen method's parameters (what it reads, what its hash covers)."""
        values = {name: getattr(self, name) for name in SPECS[self.method].params}
        if "part_alpha" in values:
            values["part_alpha"] = self.part_alpha.model_dump() if self.part_alpha else None
        return values

    def unused_fields(self) -> set[str]:
        return set(PARAMS) - set(SPECS[self.method].params)

    def references(self) -> list[Reference]:
        return model_reference("source", self.source) + model_reference("seed", self.seed) + (
            [] if self.grams is None else [Reference("grams", self.grams, frozenset({"grams"}))])


# Every merge parameter declared in merge/methods.py PARAMS is a field of a merge stage (merge_param(NAME)).
assert set(PARAMS) <= set(MergeStage.model_fields), \
    f"merge/methods.py PARAMS {sorted(set(PARAMS) - set(MergeStage.model_fields))} have no MergeStage field"


def check_gate(ctx: StageContext, weights: Path) -> dict:
    """Measure the gate's metric; record it in the stage's state and raise
    :class:`GateClosed` when it is over the limit (``status`` shows it as gated)."""
    from vlcluster.metrics.gate import GateClosed, closed_reason, gate_verdict

    gate = ctx.spec.gate
    verdict = gate_verdict(weights, gate.metric, gate.max)
    if not verdict["passed"]:
        reason = closed_reason(verdict)
        ctx.dir.write_state(reason=reason, gate=verdict)
        raise GateClosed(reason)
    ctx.dir.write_state(reason=None, gate=verdict)
    log.info("mergeability gate open: %s %.4g <= %g", gate.metric, verdict["value"], gate.max)
    return verdict


def run(ctx: StageContext) -> None:
    from vlcluster.merge.apply import merge_checkpoint

    spec = ctx.spec
    source = ctx.upstream_dir(spec.source).root
    gate = check_gate(ctx, local_copy(source / "model.safetensors")) if spec.gate else None
    params = spec.method_values()
    record = merge_checkpoint(
        source, ctx.dir.root, spec.method, params,
        base=ctx.upstream_dir(spec.seed).root if spec.seed else None,
        grams=ctx.upstream_dir(spec.grams).root if spec.grams else None,
        provenance={"stage": ctx.name, "sources": {"source": spec.source, "seed": spec.seed, "grams": spec.grams}},
    )
    log.info("merged %s (%s) with %s %s -> agnostic", spec.source, record["source_arch"], spec.method, params)
    finish_stage(ctx, {"method": spec.method, "params": params, "source": spec.source, "tensors": record["tensors"], "gate": gate})
