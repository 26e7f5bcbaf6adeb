"""Checkpoint overhead of integrity checks, in the same run.

    python tools/bench/checkpoint.py [--size tiny|base] [--runs 3] [--dir DIR]

Saves a full training checkpoint (model + AdamW state, one rank) of a
random-weight model with digests (fsync + size + sha256 of every file in
the commit marker, the default) and without digests (fsync only), and loads
it with verification (every file hashed before it is read) and without
(an old-style checkpoint with no digests). Prints best-of-N seconds and the
ratios verified / plain.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vlcluster.model import MultiwayTransformer, preset
from vlcluster.train import checkpoint as ckpt
from vlcluster.train.dist import DistEnv

ENV = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def states(size: str) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = {k: v.contiguous() for k, v in MultiwayTransformer(preset(size, "specific")).state_dict().items()}
    optim = {
        "state": {k: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(v), "exp_avg_sq": torch.rand_like(v)}
                  for k, v in model.items() if v.is_floating_point()},
        "param_groups": [{"lr": 1e-3, "params": list(model)}],
    }
    return model, optim


def best(fn, runs: int) -> float:
    fn()  # warm-up: page cache, allocator
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="ckpt-bench-"))
    model, optim = states(args.size)
    meta = {"spec_hash": "bench", "world_size": 1}
    rank = {"torch_rng": torch.get_rng_state()}

    def save(verify: bool, step: int) -> None:
        ckpt.save_checkpoint(root / ("v" if verify else "p"), step, ENV, model, optim, meta, rank, {"loader": {}}, keep=1, verify=verify)

    save_verified = best(lambda: save(True, 1), args.runs)
    save_plain = best(lambda: save(False, 1), args.runs)
    load_verified = best(lambda: ckpt.load_intact_checkpoint(root / "v", "bench", ENV), args.runs)
    load_plain = best(lambda: ckpt.load_intact_checkpoint(root / "p", "bench", ENV), args.runs)
    size_mb = sum(p.stat().st_size for p in (root / "v" / "step_00000001").iterdir()) / 1e6
    shutil.rmtree(root)
    print(f"checkpoint {args.size}: {size_mb:.1f} MB per save, best of {args.runs}")
    print(f"save  with digests {save_verified:.3f} s, without {save_plain:.3f} s, ratio {save_verified / save_plain:.2f}")
    print(f"load  verified     {load_verified:.3f} s, unverified {load_plain:.3f} s, ratio {load_verified / load_plain:.2f}")


if __name__ == "__main__":
    main()
