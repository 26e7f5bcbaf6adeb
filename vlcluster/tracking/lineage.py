"""A stage's lineage as tracking tags: the facts the study's tables are keyed by
(pipeline, architecture, K_seed, K_VL, merge and its knob, replicate seeds),
read with the study's own :class:`~vlcluster.study.lineage.Lineage`."""

from __future__ import annotations

from vlcluster.study.lineage import Lineage


def stage_tags(ctx) -> dict[str, str]:
    stages = ctx.pipeline.model_dump(mode="json", by_alias=True)["stages"]
    lineage = Lineage(stages)
    tags = {"pipeline": ctx.pipeline.name, "stage": ctx.name, "kind": ctx.spec.kind, "spec_hash": ctx.spec_hash,
            "run_dir": str(ctx.run_dir)}
    model = ctx.name if lineage.kind(ctx.name) != "eval" else lineage.model_source(ctx.name)
    arm = lineage.arm_of_model(ctx.pipeline.name, ctx.name, model, {})
    facts = {
        "arch": arm.arch, "k_seed": arm.k_seed, "k_vl": arm.k_vl, "pretrain_stage": arm.pretrain_stage,
        "merge": arm.merge.describe() if arm.merge else None,
        "merge_knob": f"{arm.merge.knob[0]}={arm.merge.knob[1]:g}" if arm.merge and arm.merge.knob else None,
        "replicate_seeds": ",".join(str(seed) for seed in arm.pretrain_seeds + arm.finetune_seeds) or None,
    }
    tags.update({key: str(value) for key, value in facts.items() if value is not None})
    return tags
