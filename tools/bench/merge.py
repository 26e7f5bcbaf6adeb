"""Streaming merge vs reading + writing the same safetensors, naive merging and mergekit.

    python tools/bench/merge.py [--size base] [--runs 3] [--mergekit /tmp/mk-venv/bin/mergekit-pytorch]

Builds a random modality-specific checkpoint in a temp dir, then times (best
of --runs, warm page cache, each in a fresh process under /usr/bin/time -v):

- read+write: ``safetensors.torch.load_file`` + ``save_file`` of the checkpoint (baseline a);
- naive: load everything, ``merge_state``, ``save_file``;
- vlcluster: the ``vlcluster merge`` command (streaming interpolation, α = 0.75);
  its input's sha256 (provenance) comes from the record written with the
  checkpoint; a second row times a copy whose record lacks it, so the merge
  hashes the file itself;
- mergekit (baseline b): ``mergekit-pytorch`` linear merge of the V and L expert
  tensors, if it is installed in a separate venv (never a vlcluster dependency).

Prints wall time (the whole command: imports count for a user), work time
(after imports) and peak RSS, with ratios against the baseline of this run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, Timing, best_of, write_random_checkpoint  # noqa: E402

READ_WRITE = """
import time, sys
from safetensors.torch import load_file, save_file
t = time.perf_counter()
save_file(load_file(sys.argv[1]), sys.argv[2], metadata={"format": "pt"})
print("WORK", time.perf_counter() - t)
"""

NAIVE = """
import time, sys
from safetensors.torch import load_file, save_file
from vlcluster.merge.apply import merge_state
t = time.perf_counter()
save_file(merge_state(load_file(sys.argv[1]), "interpolation", alpha=0.75), sys.argv[2])
print("WORK", time.perf_counter() - t)
"""

STREAM = """
import time, sys
from pathlib import Path
from vlcluster.merge.apply import merge_checkpoint
t = time.perf_counter()
merge_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), "interpolation", {"alpha": 0.75, "part_alpha": None})
print("WORK", time.perf_counter() - t)
"""


def mergekit_inputs(src: Path, root: Path) -> Path:
    """Two single-modality checkpoints (V and L experts as one agnostic model each) + a linear-merge config."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    for modality, weight in (("v", 0.75), ("l", 0.25)):
        picked = {key.replace(f".{modality}.", ".shared."): value for key, value in state.items() if f".{modality}." in key}
        (root / modality).mkdir()
        save_file(picked, str(root / modality / "model.safetensors"))
        (root / modality / "config.json").write_text("{}")
    config = root / "mergekit.yml"
    config.write_text(
        "merge_method: linear\ndtype: float32\nmodels:\n"
        f"  - model: {root / 'v' / 'model.safetensors'}\n    parameters: {{weight: 0.75}}\n"
        f"  - model: {root / 'l' / 'model.safetensors'}\n    parameters: {{weight: 0.25}}\n"
    )
    return config


def without_recorded_digest(src: Path, out: Path) -> Path:
    """The same weights (hard link) with a model.json that has no recorded sha256."""
    import json

    out.mkdir()
    os.link(src / "model.safetensors", out / "model.safetensors")
    record = json.loads((src / "model.json").read_text())
    record.pop("weights")
    (out / "model.json").write_text(json.dumps(record))
    return out


def line(name: str, timing: Timing, base: Timing, size_gb: float) -> str:
    work = f"{timing.work_s:6.2f} s ({timing.work_s / base.work_s:4.2f}x)" if timing.work_s is not None else "     n/a        "
    return (f"{name:<28} wall {timing.wall_s:6.2f} s ({timing.wall_s / base.wall_s:4.2f}x)  work {work}  "
            f"max RSS {timing.max_rss_gb:5.2f} GB ({timing.max_rss_gb / size_gb:4.2f}x checkpoint)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="base")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mergekit", default="/tmp/mk-venv/bin/mergekit-pytorch")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vlbench-"))
    try:
        src = root / "msa"
        params = write_random_checkpoint(src, args.size, "specific")
        size_gb = os.path.getsize(src / "model.safetensors") / 2**30
        print(f"checkpoint: size {args.size}, specific, {params / 1e6:.0f}M parameters, {size_gb:.2f} GB float32; {os.cpu_count()} cores")
        weights = str(src / "model.safetensors")
        base = best_of([PYTHON, "-c", READ_WRITE, weights, str(root / "rw.safetensors")], args.runs)
        rows = {"read+write (baseline a)": base}
        rows["naive load-all merge"] = best_of([PYTHON, "-c", NAIVE, weights, str(root / "naive.safetensors")], args.runs)
        rows["vlcluster streaming (work)"] = best_of([PYTHON, "-c", STREAM, str(src), str(root / "stream")], args.runs)
        unrecorded = without_recorded_digest(src, root / "msa-unrecorded")
        rows["  same, hashing the input"] = best_of([PYTHON, "-c", STREAM, str(unrecorded), str(root / "stream2")], args.runs)
        cli = [PYTHON, "-m", "vlcluster.cli", "merge", str(src), "-o", str(root / "cli"), "--alpha", "0.75"]
        rows["vlcluster merge (CLI)"] = best_of(cli, args.runs)
        if Path(args.mergekit).exists():
            config = mergekit_inputs(src, root)
            try:
                rows["mergekit-pytorch linear (b)"] = best_of([args.mergekit, str(config), str(root / "mk"), "--quiet"], 1)
            except RuntimeError as exc:
                print(f"mergekit: could not run here ({str(exc).splitlines()[-1][:200]})")
        else:
            print(f"mergekit: not installed at {args.mergekit} (pip install mergekit into a separate venv to compare)")
        for name, timing in rows.items():
            print(line(name, timing, base, size_gb))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
