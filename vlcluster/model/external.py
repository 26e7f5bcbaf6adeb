"""Checkpoints from and for other code: BEiT, ViT, the authors' VLMo layout, vlcluster.

`convert` reads a checkpoint file or directory (local or s3://) into
vlcluster names plus the structure it fixes (width, depth, patch, ...).
`fit` shapes that state for one model: layer-scale gammas folded or set to
the identity, shared weights copied into experts, every key either loaded or
reported fresh. A `ConversionReport` records what was mapped, what stays
freshly initialised and what was dropped, with reasons; nothing is dropped
silently.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from vlcluster.sizes import CHECKPOINT_FORMATS as FORMATS  # the torch-free table job files are checked against
from vlcluster.storage.paths import local_copy, read_json, run_path, writable, write_json

from . import posbias
from .config import CUSTOM_PARTS, SHARED, ModelConfig, preset
from .convert import expand_to_experts, load_into, parse_layer_key
from .files import ModelDir, write_model
from .formats import beit, vlmo
from .formats.conversion import CheckpointError, ConversionReport, same_values
from .multiway import MultiwayTransformer
from .posembed import resize_position_table

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
STATE_WRAPPERS = ("state_dict", "model", "module")  # Lightning / timm / DeepSpeed-style nesting
_GAMMA = re.compile(r"^layers\.(\d+)\.gamma_(attn|ffn)$")
IMAGE_BIAS = "position_bias.image"
# A layer-scale gamma scales a residual branch's output, i.e. the rows of its last linear.
_GAMMA_TARGETS = {"attn": "proj", "ffn": "fc2"}


@dataclass
class Converted:
    state: dict[str, Tensor]  # vlcluster names, experts as the source has them
    structure: dict[str, Any]  # ModelConfig fields the checkpoint fixes
    report: ConversionReport


# --- reading ------------------------------------------------------------------


def read_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Tensors of a checkpoint file or directory, plus its config.json / model.json record (if any)."""
    location = run_path(path)
    meta = None
    if location.is_dir():
        weights = next((location / name for name in WEIGHT_FILES if (location / name).exists()), None)
        if weights is None:
            raise CheckpointError(f"{path}: no {' or '.join(WEIGHT_FILES)} in this directory")
        meta = read_json(location / "config.json") or read_json(location / "model.json")
    elif location.exists():
        weights = location
    else:
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    return _load_weights(local_copy(weights), str(weights)), meta


def _load_weights(local: Path, name: str) -> dict[str, Tensor]:
    try:
        if local.suffix == ".safetensors":
            return load_file(str(local))
        loaded: Any = torch.load(local, map_location="cpu", weights_only=True)  # no code from the file runs
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear message
        raise CheckpointError(f"{name}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    while isinstance(loaded, dict):
        nested = next((loaded[k] for k in STATE_WRAPPERS if isinstance(loaded.get(k), dict)), None)
        if nested is None:
            break
        loaded = nested
    if not isinstance(loaded, dict) or not loaded:
        raise CheckpointError(f"{name}: no state dict of tensors inside")
    tensors = {key: value for key, value in loaded.items() if isinstance(value, Tensor)}
    if not tensors or not all(isinstance(key, str) for key in tensors):
        raise CheckpointError(f"{name}: no state dict of tensors inside")
    return tensors


def convert(path: str | Path, fmt: str) -> Converted:
    """Read `path` in format `fmt` into vlcluster names."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    tensors, meta = read_tensors(path)
    report = ConversionReport(str(path), fmt)
    structure: dict[str, Any] = {}
    if fmt in ("beit", "vit"):  # transformers writes ViT in BEiT's layout (plus a key bias, less layer scale)
        state = beit.import_state(tensors, report)
        structure = beit.position_structure(tensors)
        if meta and meta.get("model_type") in ("beit", "vit"):
            structure.update(beit.structure_from_config(meta))
    elif fmt == "vlmo":
        state = vlmo.import_state(tensors, report)
        structure = vlmo.position_structure(tensors)
    else:
        state = dict(tensors)
        report.mapped = len(state)
        if meta and isinstance(meta.get("config"), dict):
            structure = dict(meta["config"])
    structure = {**infer_structure(state, report), **structure}
    if fmt != "vlcluster":
        _drop_identity_gammas(state, structure, report)
    return Converted(state, structure, report)


def infer_structure(state: dict[str, Tensor], report: ConversionReport) -> dict[str, Any]:
    """ModelConfig fields readable from tensor shapes and names."""
    if "embed.image.cls" not in state or "embed.image.patch.weight" not in state:
        raise CheckpointError(f"{report.source}: no image embedding found (expected the format's cls token and patch projection)")
    dim = state["embed.image.cls"].shape[-1]
    patch = state["embed.image.patch.weight"].shape[-1]
    layers = {int(key.split(".")[1]) for key in state if key.startswith("layers.")}
    if not layers:
        raise CheckpointError(f"{report.source}: no transformer blocks found")
    structure: dict[str, Any] = {"dim": dim, "depth": max(layers) + 1, "patch_size": patch}
    fc1 = next((t for k, t in state.items() if k.startswith("layers.0.ffn.") and k.endswith("fc1.weight")), None)
    if fc1 is not None:
        structure["mlp_ratio"] = fc1.shape[0] / dim
    if "embed.image.pos" in state:
        side = math.isqrt(state["embed.image.pos"].shape[1] - 1)
        structure["image_size"] = side * patch
    elif IMAGE_BIAS in state:  # (2g-1)^2 + 3 rows
        side = (math.isqrt(state[IMAGE_BIAS].shape[0] - posbias.CLS_ROWS) + 1) // 2
        structure["image_size"] = side * patch
    if "embed.text.word.weight" in state:
        structure["vocab_size"] = state["embed.text.word.weight"].shape[0]
    if "embed.text.pos" in state:
        structure["max_text_len"] = state["embed.text.pos"].shape[1]
    if "heads.vqa.fc2.weight" in state:
        structure["num_answers"] = state["heads.vqa.fc2.weight"].shape[0]
    if "heads.itc.image.weight" in state:
        structure["itc_dim"] = state["heads.itc.image.weight"].shape[0]
    relative = any(key.startswith("position_bias.") for key in state)
    absolute = "embed.image.pos" in state or "embed.text.pos" in state
    structure["position"] = "both" if relative and absolute else "relative" if relative else "absolute"
    if any(_GAMMA.match(key) for key in state):
        structure["layer_scale"] = 0.1  # BEiT's and VLMo's initial value; the gammas themselves are loaded
    structure.update(_expert_layout(state, report))
    return structure


def _expert_layout(state: dict[str, Tensor], report: ConversionReport) -> dict[str, Any]:
    """arch and vl_layers from which block parts have modality experts."""
    parts, vl_layers = set(), set()
    for key in state:
        if (parsed := parse_layer_key(key)) is not None and parsed[2] != SHARED:
            parts.add(parsed[1])
            if parsed[2] == "vl":
                vl_layers.add(parsed[0])
    arch = next((a for a, custom in CUSTOM_PARTS.items() if custom == parts), None)
    if arch is None:
        arch = "specific"
        report.notes.append(
            f"experts only in {sorted(parts)}: read as arch specific (the shared parts are copied into every expert)"
        )
    # Without experts the weights do not say where fusion starts: vl_layers comes from the model.
    return {"arch": arch, "vl_layers": len(vl_layers)} if parts else {"arch": arch}


def _drop_identity_gammas(state: dict[str, Tensor], structure: dict[str, Any], report: ConversionReport) -> None:
    """Gammas that are all exactly one are no layer scale at all (the authors' layout always has them)."""
    gammas = [key for key in state if _GAMMA.match(key)]
    if gammas and same_values([state[key] for key in gammas], 1.0):
        for key in gammas:
            del state[key]
        structure["layer_scale"] = 0.0
        report.notes.append("layer-scale gammas are all one (the identity): read as no layer scale")


# --- fitting to a model -------------------------------------------------------------


def config_for(converted: Converted, size: str = "base", **overrides: Any) -> ModelConfig:
    """The checkpoint's structure on top of a size preset (for what it does not fix: vocabulary, text length)."""
    fields = {k: v for k, v in converted.structure.items() if k in ModelConfig.__dataclass_fields__}
    fields.setdefault("num_answers", 0)
    if "heads" not in fields and "heads" not in overrides:
        fields["heads"] = max(1, fields["dim"] // 64)
        converted.report.notes.append(f"attention heads not recorded in the checkpoint: assumed dim/64 = {fields['heads']}")
    fields.setdefault("itc_dim", fields["dim"])
    fields.update(overrides)
    return preset(size, fields.pop("arch"), **fields)


def fit(converted: Converted, model: MultiwayTransformer) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The converted state shaped for `model`, and the model keys it leaves fresh (key -> why)."""
    state = dict(converted.state)
    _fit_layer_scale(state, model.config, converted.report)
    _check_structure(converted, model.config)
    _fit_position_bias(state, model.config, converted.report, converted.structure.get("image_size"))
    _complete_itc_bias(state)
    target = model.state_dict()
    try:
        fitted = expand_to_experts(state, model)
    except ValueError as exc:
        raise CheckpointError(f"{converted.report.source}: {exc}") from None
    unused = sorted(k for k in state if k not in fitted and k not in target and parse_layer_key(k) is None)
    for key in unused:
        converted.report.drop(key, "not part of this model (e.g. a head it does not train)")
    fresh = {key: _fresh_reason(key) for key in target if key not in fitted}
    _check_shapes(fitted, target, converted.report.source)
    for head in model.heads:
        keys = [k for k in target if k.startswith(f"heads.{head}.")]
        if any(k in fresh for k in keys):  # a head is loaded whole or not at all
            for key in keys:
                fitted.pop(key, None)
                fresh[key] = _fresh_reason(key)
    converted.report.fresh.update(fresh)
    return fitted, fresh


def _fresh_reason(key: str) -> str:
    if key.startswith("heads."):
        return "task head not in the checkpoint"
    if key.startswith(("embed.text.", "embed.token_type.")):
        return "text / token-type embedding not in the checkpoint (vision-only source)"
    if key in ("position_bias.text", "position_bias.cross"):
        return "relative position bias of text and image<->text pairs not in the checkpoint (vision-only source)"
    return "not in the checkpoint"


def _fit_layer_scale(state: dict[str, Tensor], config: ModelConfig, report: ConversionReport) -> None:
    gammas = {key: m for key in list(state) if (m := _GAMMA.match(key))}
    if gammas and not config.layer_scale:
        for key, m in gammas.items():
            _fold_gamma(state, int(m[1]), m[2], state.pop(key))
        report.notes.append(
            "layer-scale gammas folded into the attention output and fc2 weights (exact; model.layer_scale is off)"
        )
    elif not gammas and config.layer_scale:
        for layer in {int(k.split(".")[1]) for k in state if k.startswith("layers.")}:
            for branch in _GAMMA_TARGETS:
                state[f"layers.{layer}.gamma_{branch}"] = torch.ones(config.dim)
        report.notes.append("no layer scale in the checkpoint: gammas set to one (the identity), then trained")


def _fold_gamma(state: dict[str, Tensor], layer: int, part: str, gamma: Tensor) -> None:
    linear = _GAMMA_TARGETS[part]
    for key in list(state):
        parsed = parse_layer_key(key)
        if parsed and parsed[:2] == (layer, part) and parsed[3] in (f"{linear}.weight", f"{linear}.bias"):
            scale = gamma[:, None] if parsed[3].endswith("weight") else gamma
            state[key] = state[key] * scale


def _fit_position_bias(state: dict[str, Tensor], config: ModelConfig, report: ConversionReport, image_size: int | None) -> None:
    """Image position tables resized to the model's resolution (a fine-tune at 384 or 480 px of a
    224 px checkpoint, as VLMo's); the authors' whole table split for this model; a shared table
    copied to every layer for a per-layer model."""
    if vlmo.WHOLE_TABLE in state:
        grid = image_size // config.patch_size if image_size else config.grid
        state.update(vlmo.split_table(state.pop(vlmo.WHOLE_TABLE), grid, config.max_text_len, report.source))
    if image_size and image_size != config.image_size:
        if "embed.image.pos" in state:
            state["embed.image.pos"] = resize_position_table(state["embed.image.pos"], config.grid)
        if IMAGE_BIAS in state:
            state[IMAGE_BIAS] = posbias.resize_image_table(state[IMAGE_BIAS], config.grid)
        report.notes.append(f"image position tables resized from {image_size} px to {config.image_size} px (bicubic, [CLS] kept)")
    tables = [key for key in vlmo.BIAS_PARTS if key in state]
    if not tables or not config.relative_positions:
        return
    columns = state[tables[0]].shape[1]
    if config.relative_bias == "per_layer" and columns == config.heads and config.depth > 1:
        for key in tables:
            state[key] = state[key].repeat(1, config.depth)
        report.notes.append("shared relative position bias copied to every layer (the same scores; model.relative_bias is per_layer)")
    elif config.relative_bias == "shared" and columns != config.heads:
        raise CheckpointError(
            f"{report.source}: a relative position bias per layer does not fit model.relative_bias: shared "
            "(set model.relative_bias: per_layer)"
        )


def _complete_itc_bias(state: dict[str, Tensor]) -> None:
    """The authors' ITC projections have no bias: a zero bias is the same function."""
    for side in ("image", "text"):
        weight = state.get(f"heads.itc.{side}.weight")
        if weight is not None and f"heads.itc.{side}.bias" not in state:
            state[f"heads.itc.{side}.bias"] = weight.new_zeros(weight.shape[0])


# image_size is not among them: the position tables are resized to the model's resolution.
STRUCTURE_CHECKED = ("dim", "depth", "heads", "patch_size", "mlp_ratio", "vocab_size", "max_text_len", "position")


def _check_structure(converted: Converted, config: ModelConfig) -> None:
    mismatches = [
        f"model.{name}: the checkpoint has {converted.structure[name]}, the model {getattr(config, name)}"
        for name in STRUCTURE_CHECKED
        if name in converted.structure and converted.structure[name] != getattr(config, name)
    ]
    if mismatches:
        raise CheckpointError(f"{converted.report.source} does not fit the model: " + "; ".join(mismatches))
    eps = converted.structure.get("layer_norm_eps")
    if eps is not None and eps != config.layer_norm_eps:
        converted.report.notes.append(f"LayerNorm eps {eps:g} in the checkpoint, {config.layer_norm_eps:g} in the model")


def _check_shapes(state: dict[str, Tensor], target: dict[str, Tensor], source: str) -> None:
    wrong = [
        f"{key} {tuple(state[key].shape)} vs {tuple(target[key].shape)}"
        for key in state
        if key in target and state[key].shape != target[key].shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: tensor shapes do not fit the model (checkpoint vs model): " + "; ".join(wrong[:5]))


# --- entry points -----------------------------------------------------------------------


def init_from_checkpoint(model: MultiwayTransformer, path: str, fmt: str) -> ConversionReport:
    """Load an external checkpoint into `model`: strict except for the reported fresh keys."""
    converted = convert(path, fmt)
    state, fresh = fit(converted, model)
    load_into(model, state, allow_missing_prefixes=tuple(fresh))
    return converted.report


def convert_to_model_dir(src: str, fmt: str, out: str, size: str = "base", seed: int = 0, **overrides: Any) -> ConversionReport:
    """`vlcluster convert --from FMT SRC -o OUT`: a vlcluster model directory
    (model.safetensors + model.json, like a pre-training stage's output)."""
    converted = convert(src, fmt)
    config = config_for(converted, size, **overrides)
    task_heads = tuple(sorted({key.split(".")[1] for key in converted.state if key.startswith("heads.")}))
    with torch.device("meta"):  # only the fresh parts are initialised (a base model's full init takes a minute)
        model = MultiwayTransformer(config, heads=task_heads)
    state, fresh = fit(converted, model)
    model.to_empty(device="cpu")
    load_into(model, state, allow_missing_prefixes=tuple(fresh))
    torch.manual_seed(seed)  # fresh parts are reproducible
    model.init_modules_of(fresh)
    provenance = {"converted_from": str(src), "format": fmt, "seed": seed, "conversion": converted.report.summary()}
    write_model(ModelDir(run_path(out)), model.state_dict(), config, provenance)
    return converted.report


def vlcluster_model(src: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Weights and config of any model vlcluster writes: a stage or converted
    directory, a training checkpoint (checkpoints/step_N), or the weights file of one."""
    from .load import locate_model

    found = locate_model(src)
    return found.tensors(), found.config


def export_vlmo(src: str, out: str) -> ConversionReport:
    """`vlcluster convert --to vlmo SRC -o OUT`: a vlcluster model in the authors' layout.

    OUT ending in .safetensors is one safetensors file; .pt / .ckpt a torch
    file ``{"state_dict": …}`` as the authors' code loads it; anything else a
    directory with model.safetensors and conversion.json."""
    tensors, config = vlcluster_model(src)
    report = ConversionReport(str(src), "vlcluster")
    state = {key: value.contiguous() for key, value in vlmo.export_state(tensors, config, report).items()}
    target = run_path(out)
    if str(out).endswith(".safetensors"):
        with writable(target) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
    elif str(out).endswith((".pt", ".ckpt")):
        with writable(target) as tmp:
            torch.save({"state_dict": state}, tmp)
    else:
        with writable(target / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_json(target / "conversion.json", {"config": config.to_dict(), "conversion": report.summary()})
    return report



def export_beit(src: str, out: str) -> ConversionReport:
    """`vlcluster convert --to beit SRC -o OUT`: a vlcluster model's image route as a
    `transformers` BEiT directory (model.safetensors + config.json), loadable with
    ``BeitModel.from_pretrained(OUT)`` so a merged model can be used outside vlcluster."""
    tensors, config = vlcluster_model(src)
    report = ConversionReport(str(src), "vlcluster")
    state, beit_config = beit.export_state(tensors, config, report)
    target = run_path(out)
    with writable(target / "model.safetensors") as tmp:
        save_file({key: value.contiguous() for key, value in state.items()}, str(tmp), metadata={"format": "pt"})
    write_json(target / "config.json", beit_config)
    return report
