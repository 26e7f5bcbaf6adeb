"""Streaming merge: safetensors in, safetensors out, one tensor group in memory.

The output header is written first (shapes and dtypes are known from the
plan), then each tensor in header order: merged ones are computed from their
expert group and written, pass-through ones (embeddings, heads, parts that
are already shared) are copied file-to-file. Peak memory is the largest
group plus the output tensor, not the checkpoint.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

from vlcluster.merge.engine import MergeInputs, merge_tensor
from vlcluster.merge.layout import MergeTensor, plan_merge
from vlcluster.storage.tensorfile import TensorFile, TensorFileWriter


def output_layout(steps: list, source: TensorFile) -> dict:
    """Output key -> (dtype, shape): a merged tensor has its V expert's dtype and shape."""
    layout = {}
    for step in steps:
        key = step.experts["v"] if isinstance(step, MergeTensor) else step.source_key
        entry = source.entries[key]
        layout[step.key] = (entry.dtype, entry.shape)
    return layout


def stream_merge(source: TensorFile, out_path: Path, inputs: MergeInputs, metadata: dict[str, str] | None = None) -> int:
    """Write the merged checkpoint to ``out_path``; returns the number of tensors."""
    steps = {step.key: step for step in plan_merge(source.keys())}
    writer = TensorFileWriter(out_path, output_layout(list(steps.values()), source), metadata)
    try:
        for key in writer.order:
            step = steps[key]
            if isinstance(step, MergeTensor):
                writer.write(key, merge_tensor(step, source, inputs))
            else:
                writer.copy_from(key, source, step.source_key)
    finally:
        writer.close()
    return len(steps)


def merge_files(
    source: Path, out_path: Path, method, params: dict, base: Path | None = None, grams: Path | None = None,
    metadata: dict[str, str] | None = None, prefixes: dict[str, str] | None = None,
) -> int:
    """Open the inputs, stream the merge into a temp file, rename it into place.

    ``prefixes`` (input name -> key prefix): the model's tensors in a training
    checkpoint sit under the objective's prefix."""
    prefixes = prefixes or {}
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    with ExitStack() as stack:
        def open_file(path: Path | None, name: str) -> TensorFile | None:
            return None if path is None else stack.enter_context(TensorFile(path, prefixes.get(name, "")))

        inputs = MergeInputs(method, params, base=open_file(base, "base"), grams=open_file(grams, "grams"))
        count = stream_merge(open_file(source, "source"), tmp, inputs, metadata)
    os.replace(tmp, out_path)
    return count
