"""Peak dense FLOP/s of the accelerators vlcluster reports MFU against.

Numbers are NVIDIA's data-sheet peaks in TFLOP/s for *dense* matrices (the
"with sparsity" figures are twice these and not used): ``fp16``/``bf16`` are
tensor-core rates with float32 accumulation where the data sheet gives it,
``fp32`` is the plain (non-tensor-core, non-TF32) float32 rate, which is what
vlcluster's fp32 runs use (TF32 matmuls are not enabled). MFU = achieved
model FLOP/s / peak of the precision the run computes in. A device missing
here (or the CPU) gets FLOP/s but no MFU.
"""

from __future__ import annotations

import re

# (regular expression searched in torch.cuda.get_device_name(), peaks). Checked in order: more
# specific names first; word boundaries keep "A10" from matching "A100"/"A10G" and "L4" "L40S".
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # V100 SXM2: 125 TFLOP/s fp16 tensor core, 15.7 fp32; no bf16 (compute capability 7.0).
    (r"V100-SXM", {"fp16": 125.0, "fp32": 15.7}),
    # V100 PCIe: 112 fp16 tensor core, 14 fp32.
    (r"V100", {"fp16": 112.0, "fp32": 14.0}),
    # A100 (SXM4 and PCIe, 40 and 80 GB): 312 bf16/fp16 dense tensor core, 19.5 fp32.
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    # H100 PCIe: 756 bf16/fp16 dense (1,513 with sparsity), 51 fp32.
    (r"H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    # H100 NVL: 835 bf16/fp16 dense (1,671 with sparsity), 60 fp32.
    (r"H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    # H100 SXM5 ("NVIDIA H100 80GB HBM3"): 989 bf16/fp16 dense (1,979 with sparsity), 67 fp32.
    (r"H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    # H200 NVL (PCIe card): 835 bf16/fp16 dense (1,671 with sparsity), 60 fp32.
    (r"H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    # H200 SXM: the H100 SXM's compute with more memory: 989 bf16/fp16 dense, 67 fp32.
    (r"H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    # L40S: 362 bf16/fp16 dense with fp32 accumulate (733 with sparsity), 91.6 fp32.
    (r"L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    # L4: 121 bf16/fp16 dense (242 with sparsity), 30.3 fp32.
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    # A10 (not the cloud-only A10G, whose peaks NVIDIA does not publish): 125 bf16/fp16 dense, 31.2 fp32.
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """Peak dense TFLOP/s of one device in ``precision``, or None when unknown."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):  # a profile may write v100
            return peaks.get(precision)
    return None
