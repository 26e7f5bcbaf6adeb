"""The pieces every stage spec is made of, and the SLURM cluster profile.

A stage kind's own spec model lives with its runner in
``vlcluster/stages/<kind>.py`` and builds on these (``StageBase``, ``DataSpec``,
``TrainSpec`` ...); ``jobspec/pipeline.py`` joins the kinds into a job file.
Models are strict about unknown keys so a typo in a job file is an error at
load time, not a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlcluster.jobspec.references import Reference, model_reference
from vlcluster.sizes import ARCHS, CHECKPOINT_FORMATS, POSITIONS, RELATIVE_BIASES, SIZES, STRUCTURE_FIELDS, check_structure
from vlcluster.tasks.registry import TASK_NAMES

# Names from their registries (a new entry there is accepted here): sizes.py's
# presets and layouts, tasks/registry.py.
Arch = Literal[ARCHS]
Size = Literal[SIZES]
Precision = Literal["fp32", "bf16", "fp16", "auto"]
Device = Literal["auto", "cpu", "cuda"]
TaskName = Literal[TASK_NAMES]


class Strict(BaseModel):
    # strict: no silent coercion (``steps: true`` is not 1, ``"10"`` is not 10);
    # finite floats only (``lr: .inf`` and ``.nan`` are typos, never settings).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True, allow_inf_nan=False)


class StageRef(Strict):
    """A reference to another stage's output (``{from: seed}``)."""

    from_: str = Field(alias="from", description="name of the stage whose output is used")


class InitSpec(Strict):
    """Initial weights of a training stage: another stage's output (``{from: seed}``)
    or an external checkpoint (``{checkpoint: PATH, format: beit}``), converted on load."""

    from_: str | None = Field(None, alias="from", description="name of the stage whose output is used")
    checkpoint: str | None = Field(None, description="checkpoint file or directory, local or s3://, or hf://ORG/NAME[@REVISION] from the Hugging Face Hub")
    format: Literal[CHECKPOINT_FORMATS] | None = Field(
        None, description="layout of `checkpoint`: beit or vit (transformers or timm), vlmo (the authors' code), vlcluster"
    )

    @model_validator(mode="after")
    def _one_source(self) -> InitSpec:
        if (self.from_ is None) == (self.checkpoint is None):
            raise ValueError("give exactly one of 'from' (a stage) or 'checkpoint' (a file or directory)")
        if self.checkpoint is not None and self.format is None:
            raise ValueError(f"'checkpoint' needs 'format': {', '.join(CHECKPOINT_FORMATS[:-1])} or {CHECKPOINT_FORMATS[-1]}")
        if self.from_ is not None and self.format is not None:
            raise ValueError("'format' goes with 'checkpoint'; a stage output is always vlcluster's")
        return self

    def references(self) -> list[Reference]:
        return model_reference("init.from", self.from_)


class ModelSpec(Strict):
    """A size preset (`size`, the presets of vlcluster/sizes.py) plus explicit overrides of its structure."""

    arch: Arch = "agnostic"
    size: Size = "tiny"
    vl_layers: int | None = Field(None, ge=0, description="top M layers with a VL expert (default from size)")
    image_size: int | None = Field(None, gt=0, description="input resolution (default: the data stage's, else from size)")
    max_text_len: int | None = Field(None, gt=0)
    dim: int | None = Field(None, gt=0, description="hidden width (default from size)")
    depth: int | None = Field(None, gt=0, description="N: layers (default from size)")
    heads: int | None = Field(None, gt=0, description="attention heads; must divide dim (default from size)")
    patch_size: int | None = Field(None, gt=0, description="ViT patch size; must divide image_size (default from size)")
    mlp_ratio: float | None = Field(None, gt=0, description="FFN width / dim (default from size)")
    layer_scale: float | None = Field(
        None, ge=0, description="initial value of BEiT/VLMo per-channel residual scales (e.g. 0.1); unset or 0: none"
    )
    position: Literal[POSITIONS] | None = Field(
        None, description="absolute position tables, a relative position bias on the attention scores (VLMo, BEiT), "
        "or both (default from size: base relative, tiny and vit_tiny absolute)"
    )
    relative_bias: Literal[RELATIVE_BIASES] | None = Field(
        None, description="with a relative bias: a table per layer (VLMo) or one for all layers (BEiT's shared option)"
    )

    def overrides(self) -> dict[str, Any]:
        """The structure fields this spec sets explicitly (on top of the size preset)."""
        return {name: value for name in STRUCTURE_FIELDS if (value := getattr(self, name)) is not None}

    @model_validator(mode="after")
    def _consistent_structure(self) -> ModelSpec:
        check_structure(self.size, self.overrides(), image_size_known=self.image_size is not None)
        return self


FIELD_NAME = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"


class FieldsSpec(Strict):
    """Which files of a sample hold its image and captions (first present wins).

    A name is a file extension (``jpg``, ``txt``: one caption per line) or a
    JSON value (``json.caption``: a string or a list of strings). The
    defaults read img2dataset shards and the synthetic benchmark.
    """

    image: list[Annotated[str, Field(pattern=FIELD_NAME)]] = Field(["jpg", "jpeg", "png", "webp"], min_length=1)
    caption: list[Annotated[str, Field(pattern=FIELD_NAME)]] = Field(["txt", "json.caption"], min_length=1)


def countable_patterns(patterns: str | list | None) -> str | list | None:
    """Shard patterns whose braces expand to a list that can be held: a range
    like ``{0..99999999}`` is a typo, refused at load time where the error can
    name the job file and the field (counted, never expanded)."""
    from vlcluster.storage.shardlist import check_size

    for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
        if isinstance(pattern, str):
            check_size(pattern)
    return patterns


class SourceSpec(Strict):
    """One corpus of a training mixture."""

    shards: str | list[str] = Field(description="shard URL pattern(s), brace expansion allowed")
    weight: float = Field(1.0, gt=0, description="relative sampling weight")

    _countable = field_validator("shards")(countable_patterns)


# The kinds a ``data.from`` may name: they write shards (and a tokenizer) for others to read.
DATA_KINDS = frozenset({"data", "import"})


class DataSpec(Strict):
    """Where a training or evaluation stage reads from.

    Either ``from:`` names a ``data`` stage (shards, tokenizer and answer list
    come from its output), or the URLs are given directly.
    """

    from_: str | None = Field(None, alias="from", description="a data stage to read from")
    train: str | list[str] | list[SourceSpec] | None = Field(
        None, description="shard URL pattern(s), brace expansion allowed; or a mixture: a list of {shards, weight}"
    )
    val: str | list[str] | None = None
    tokenizer: str | None = Field(None, description="a tokenizer.json (local or s3://), or hf://ORG/NAME[@REVISION] from the Hugging Face Hub")
    answers: str | None = Field(None, description="JSON list of VQA answers")
    fields: FieldsSpec = FieldsSpec()
    augment: Literal["none", "randaugment"] = Field(
        "none", description="training images: randaugment = random resized crop + RandAugment (needs kornia), seeded per sample"
    )
    augment_flip: bool = Field(False, description="random horizontal flips (off: captions say left and right)")
    shuffle_buffer: int = Field(256, ge=1)
    shuffle_run: Annotated[int, Field(ge=1, le=4096)] | Literal["auto"] = Field(
        "auto", description="the shuffle window is permuted in runs of this many consecutive items of a "
        "shard: a reader's slice of a step then comes from few shards in few ranged reads (1: every item on its own; "
        "auto: 16 for shards on an object store, 1 on a file system)"
    )
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        0, description="data-loader worker processes per training rank (0: decode in the rank; auto: the node's "
        "CPUs per rank less one, at most 8, see data/loader.py); a checkpoint resumes with any number"
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="a training stage fails when more of the samples read are bad "
        "(bad samples are skipped and counted per shard)"
    )

    _countable = field_validator("train", "val")(countable_patterns)

    @model_validator(mode="after")
    def _source_given(self) -> DataSpec:
        if self.from_ is None and self.train is None and self.val is None:
            raise ValueError("give either 'from' (a data stage) or shard URLs in 'train'/'val'")
        if self.from_ is not None and (self.train or self.val or self.tokenizer):
            raise ValueError("'from' and explicit URLs/tokenizer are exclusive")
        return self

    def references(self) -> list[Reference]:
        return [] if self.from_ is None else [Reference("data.from", self.from_, DATA_KINDS)]

    def train_sources(self) -> list[SourceSpec]:
        """``train`` as a list of weighted sources (a plain pattern or list of them is one source)."""
        if not self.train:
            return []
        if isinstance(self.train, list) and all(isinstance(item, SourceSpec) for item in self.train):
            return list(self.train)
        return [SourceSpec(shards=self.train)]

    def train_patterns(self) -> list[str]:
        """Every training shard pattern, of every source."""
        return [p for source in self.train_sources() for p in ([source.shards] if isinstance(source.shards, str) else source.shards)]


class LossWeights(Strict):
    itc: float = Field(1.0, ge=0)
    itm: float = Field(1.0, ge=0)
    mlm: float = Field(0.25, ge=0)
    vqa: float = Field(0.0, ge=0)


class TrainSpec(Strict):
    steps: int = Field(ge=0, description="0: no training, the stage writes its initial weights (e.g. K_seed = 0 in a sweep over the seed length)")
    batch_size: int = Field(64, gt=0, description="global batch over all ranks")
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: Annotated[tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]], Field(strict=False)] = (0.9, 0.98)
    loss_weights: LossWeights = LossWeights()
    mask_prob: float = Field(0.15, gt=0, lt=1, description="MLM masking rate")
    vqa_loss: Literal["softmax", "bce"] = Field(
        "softmax", description="bce: the paper's loss for VQA v2 soft scores; softmax: for single-answer data"
    )
    compile: bool = Field(False, description="torch.compile each transformer block (TorchInductor)")
    activation_checkpointing: bool = Field(
        False, description="recompute each block's activations in backward: a fraction of the memory for one more forward"
    )
    micro_batch_size: int | None = Field(
        None, ge=2, description="samples per forward/backward on a rank; the rank's share of batch_size is reached by "
        "gradient accumulation (ITC's negatives are then per micro-batch, see train/accumulate.py)"
    )
    precision: Precision = Field(
        "fp32", description="fp32; bf16 or fp16 (FSDP2 mixed precision, fp32 master weights, fp16 with a dynamic "
        "loss scale); auto: bf16 on GPUs that support it, else fp16; fp32 on the CPU (see train/precision.py)"
    )
    device: Device = "auto"
    seed: int = 0
    log_every: int = Field(10, gt=0)

    def rank_batch_sizes(self, world_size: int) -> list[int]:
        """The global batch split over ranks as evenly as possible."""
        base, extra = divmod(self.batch_size, world_size)
        if base < 2:
            raise ValueError(
                f"train.batch_size {self.batch_size} gives fewer than 2 samples per rank over {world_size} ranks"
            )
        return [base + (1 if rank < extra else 0) for rank in range(world_size)]


class ResourcesSpec(Strict):
    """What one stage asks of the cluster. Not part of the stage's identity:
    changing resources never invalidates a finished stage."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    procs_per_node: int | None = Field(None, ge=1, description="ranks per node (default: gpus_per_node, or 1)")
    cpus_per_node: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    time_min: int | None = Field(None, gt=0)
    shm_gb: float | None = Field(None, gt=0, description="/dev/shm per node for data-loader workers (k8s; default: a share of mem_gb)")
    profile: str | None = Field(None, description="cluster profile in slurm/")
    max_concurrent: int | None = Field(
        None, ge=1, description="at most this many elements of this stage's sweep (or copies made by the pipeline "
        "sweep) run at once; SLURM: the array's %N throttle"
    )

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


class CheckpointSpec(Strict):
    dir: str | None = Field(None, description="default: <run_dir>/<stage>/checkpoints")
    every: int = Field(100, gt=0, description="steps between checkpoints")
    keep: int = Field(2, ge=1, description="newest checkpoints kept")


class StageBase(Strict):
    after: list[str] = Field(default_factory=list, description="extra dependencies")
    resources: ResourcesSpec = ResourcesSpec()
    sweep: dict[str, list[Any]] | None = Field(
        None,
        description="field path within the stage -> values; the stage runs once per combination "
        "as 'name[key=value,...]' (one SLURM job array)",
    )

    @field_validator("sweep")
    @classmethod
    def _sweep_fields(cls, sweep: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        for key, values in (sweep or {}).items():
            if key.split(".")[0] in {"kind", "sweep", "after", "resources"}:
                raise ValueError(f"{key!r} cannot be swept (only fields that change what the stage computes)")
            if not values:
                raise ValueError(f"sweep over {key!r} has no values")
        return sweep

    def unused_fields(self) -> set[str]:
        """Fields that do not apply to this stage as configured (left out of its hash)."""
        return set()

    def references(self) -> list[Reference]:
        """The stages whose outputs this one reads, in the order of its fields (a kind with
        such fields declares them here); ``after:`` adds dependencies without reading."""
        return []


class ClusterProfile(Strict):
    """A SLURM cluster profile (``slurm/<name>.yaml``): where jobs go and the
    per-GPU defaults a stage's ``resources`` is completed with."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = Field(None, description="sbatch --constraint, e.g. a GPU model feature")
    gpus_per_node: int = Field(0, ge=0, description="GPUs a node of this cluster has")
    gpu_type: str | None = Field(None, description="GRES type, e.g. v100 -> --gpus-per-node=v100:8")
    gpu_name: str | None = Field(
        None, description="the device name torch reports, e.g. 'Tesla V100-SXM2-32GB': its peak FLOP/s and measured "
        "MFU give plan's estimates (default: gpu_type)"
    )
    cpus_per_gpu: int | None = Field(None, ge=1)
    mem_gb_per_gpu: float | None = Field(None, gt=0)
    cpus_per_node: int | None = Field(None, ge=1, description="default CPUs for a stage without GPUs")
    mem_gb: float | None = Field(None, gt=0, description="default memory for a stage without GPUs")
    time_min: int = Field(60, gt=0, description="default time limit")
    signal_delay_s: int = Field(120, ge=10, description="USR2 this long before the time limit: checkpoint and requeue")
    max_requeues: int = Field(20, ge=0, description="time-outs a stage may be requeued after")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the stage (module load, ...)")
    python: str | None = Field(None, description="python on the nodes (default: the submitting interpreter)")
    sbatch: dict[str, str | int | bool] = Field(default_factory=dict, description="further sbatch flags")


