"""TSSD (and the other metrics) on the V/L weights of a `size: base` MSA model
vs a sort-based numpy TSSD, in the same run.

    python tools/bench/metrics.py [--size base] [--density 0.5]

V and L tensors take the shapes of every V/L expert pair of the model
(~85M entries each for `base`); L = 0.8·V + noise, like experts trained from
one seed. vlcluster computes all four metrics per layer and overall; numpy
computes only the overall TSSD (sorting |x| and |y| for the thresholds).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from vlcluster.metrics.distance import Pair, distances, vl_pairs
from vlcluster.model import MultiwayTransformer, parse_layer_key, preset


def random_pairs(size: str) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in MultiwayTransformer(preset(size, "specific"), heads=()).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    layers: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer, pairs in vl_pairs(shapes).items():
        for v_key, _ in pairs:
            v = torch.randn(shapes[v_key], generator=generator) * 0.02
            layers.setdefault(layer, []).append((v, 0.8 * v + 0.012 * torch.randn(shapes[v_key], generator=generator)))
    assert all(parse_layer_key(k) for k in shapes if k.startswith("layers."))
    return layers


def numpy_sort_tssd(x: np.ndarray, y: np.ndarray, density: float) -> float:
    drop = x.size - math.ceil(density * x.size)
    tx, ty = np.sort(np.abs(x))[drop - 1], np.sort(np.abs(y))[drop - 1]
    xt, yt = np.where(np.abs(x) > tx, x, 0), np.where(np.abs(y) > ty, y, 0)
    valid = (xt != 0) | (yt != 0)
    a, b = xt[valid].astype(np.float64), yt[valid].astype(np.float64)
    return 1 - float(np.mean(np.abs(a + b) / (np.abs(a) + np.abs(b))))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="base")
    parser.add_argument("--density", type=float, default=0.5)
    args = parser.parse_args()
    layers = random_pairs(args.size)
    x = np.concatenate([v.numpy().ravel() for pairs in layers.values() for v, _ in pairs])
    y = np.concatenate([l.numpy().ravel() for pairs in layers.values() for _, l in pairs])
    print(f"{x.size / 1e6:.1f}M entries per modality, {len(layers)} layers, {torch.get_num_threads()} torch threads")

    started = time.perf_counter()
    reference = numpy_sort_tssd(x, y, args.density)
    numpy_s = time.perf_counter() - started

    started = time.perf_counter()
    result = distances({layer: [Pair(v, l) for v, l in pairs] for layer, pairs in layers.items()}, args.density)
    ours_s = time.perf_counter() - started

    tssd = result["overall"]["tssd"]
    print(f"numpy sort TSSD (overall only)            {numpy_s:6.2f} s  tssd {reference:.8f}")
    print(f"vlcluster, 4 metrics, overall + per layer {ours_s:6.2f} s  tssd {tssd:.8f}  ({numpy_s / ours_s:.1f}x faster)")
    assert abs(tssd - reference) < 1e-6, "TSSD differs from the numpy reference"


if __name__ == "__main__":
    main()
