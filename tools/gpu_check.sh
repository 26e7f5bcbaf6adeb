#!/usr/bin/env bash
# GPU check of the training path, for one GPU of the H100/H200 class, in under 8 minutes:
#
#   1. installs what is missing: on a fresh machine (python3 and a CUDA driver) a venv with torch
#      from PyPI (the default Linux x86_64 wheel is a CUDA build) and `pip install -e '.[test]'`;
#      where python3 already has a CUDA torch (an image with PyTorch) only the project's own
#      dependencies, from wheels in .whl/ if that folder exists (machines without internet), else
#      from PyPI;
#   2. runs the trainer (vlcluster submit, local backend, torchrun) for a few steps in fp16 and in
#      bf16 on the tiny model: 2 ranks (FSDP2 over NCCL) where 2 GPUs exist, 1 rank on one GPU
#      (NCCL refuses two ranks on one GPU); checks losses are finite and fp16 skipped only a few steps;
#   3. runs tools/bench/train.py (size base, batch 128, 224 px, text 40, bf16): the eager baseline,
#      vlcluster's trainer path with compiled blocks, and with activation checkpointing; checks the
#      eager and compiled losses agree within tolerance;
#   4. prints one table (and writes it, the logs and the JSON results to $OUT, else ./gpu_check_out).
#
# On a machine without internet whose python3 has a CUDA torch but not the project's other
# dependencies, put their wheels into .whl/ first (where pip works: `pip download --no-deps
# --only-binary=:all: -d .whl pydantic pydantic-core annotated-types typing-inspection webdataset
# braceexpand`, with the target's --python-version and --platform).
#
# Fails loudly on any error. GPU_CHECK_CPU=1 runs the same steps on the CPU (tiny sizes, fp32 and
# fp16, gloo) to check the script itself on a machine without a GPU.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$REPO/gpu_check_out}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/vlcluster-gpu-check.XXXXXX)}
CPU_MODE=${GPU_CHECK_CPU:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
cd "$REPO"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
fail() { echo "GPU CHECK FAILED: $*" >&2; exit 1; }
trap 'echo "GPU CHECK FAILED at line $LINENO (exit $?): see $OUT/gpu_check.log" >&2' ERR

has_cuda_torch() { "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
has_project_deps() { "$PY" -c 'import pydantic, webdataset, braceexpand, tokenizers, safetensors, yaml, tensorboard, rich' 2>/dev/null; }

install() {
    step "install"
    if [[ "$CPU_MODE" == 1 ]]; then
        has_project_deps || fail "GPU_CHECK_CPU=1 expects an environment with the project installed (PYTHON=...)"
    elif has_cuda_torch; then
        echo "python3 has a CUDA torch: $("$PY" -c 'import torch; print(torch.__version__)')"
        if ! has_project_deps; then
            if [[ -d "$REPO/.whl" ]]; then  # no internet: the wheels were carried along
                "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$REPO"/.whl/*.whl
                export PYTHONPATH="$PYTHONPATH:$WORK/site"
            else
                "$PY" -m pip install -q -e "${REPO}[test]"
            fi
        fi
    else
        "$PY" -m venv "$WORK/venv"
        PY="$WORK/venv/bin/python"
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q torch  # the default wheel on Linux x86_64 is a CUDA build
        "$PY" -m pip install -q -e "${REPO}[test]"
        has_cuda_torch || fail "torch $("$PY" -c 'import torch; print(torch.__version__)') sees no GPU (driver? CUDA_VISIBLE_DEVICES?)"
    fi
    has_project_deps || fail "the project's dependencies are still missing (pydantic, webdataset, ...)"
    "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
for index in range(torch.cuda.device_count()):
    print(f"  cuda:{index} {torch.cuda.get_device_name(index)}, compute capability {torch.cuda.get_device_capability(index)}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
EOF
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    fi
}

trainer_runs() {
    step "trainer: a few steps in each precision under torchrun"
    local gpus procs device steps=30
    local -a precisions
    if [[ "$CPU_MODE" == 1 ]]; then
        gpus=0 procs=2 device=cpu steps=6
        precisions=(fp32 fp16)
    else
        gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
        procs=$(( gpus >= 2 ? 2 : 1 )) device=cuda
        gpus=$procs
        precisions=(fp16 bf16)
    fi
    local job="$WORK/gpu_check.yaml"
    {
        echo "name: gpu_check"
        echo "stages:"
        echo "  data: {kind: data, n_train: 2000, n_val: 100, shard_size: 100, image_size: 32}"
        for precision in "${precisions[@]}"; do
            echo "  train_$precision:"
            echo "    kind: pretrain"
            echo "    model: {size: tiny, arch: agnostic}"
            echo "    data: {from: data, num_workers: 2}"
            echo "    train: {steps: $steps, batch_size: 64, log_every: 3, lr: 5.0e-4, precision: $precision, device: $device}"
            echo "    checkpoint: {every: $(( steps / 2 )), keep: 1}"
            echo "    resources: {procs_per_node: $procs, gpus_per_node: $gpus}"
        done
    } > "$job"
    cat "$job"
    "$PY" -m vlcluster.cli submit "$job" --run-dir "$WORK/runs" | tee "$OUT/trainer.log"
    for precision in "${precisions[@]}"; do
        cp "$WORK/runs/train_$precision/result.json" "$OUT/trainer_$precision.json"
    done
    "$PY" - "$WORK/runs" "$steps" "${precisions[@]}" <<'EOF'
import json, math, sys
from pathlib import Path
runs, steps, precisions = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
for precision in precisions:
    result = json.loads((runs / f"train_{precision}" / "result.json").read_text())
    final, throughput = result["final"], result["throughput"]
    assert result["steps"] == steps, result
    assert math.isfinite(final["loss/loss"]), f"{precision}: loss {final['loss/loss']}"
    assert result["precision"]["precision"] == precision, result["precision"]
    skipped = result["precision"]["skipped_steps"]
    assert skipped <= 10, f"{precision}: {skipped} of {steps} steps skipped by the loss scale"
    print(f"trainer {precision}: loss {final['loss/loss']:.3f}, skipped steps {skipped}, "
          f"{throughput['samples_per_s']:.0f} samples/s, MFU {throughput['mfu']}")
EOF
}

bench() {
    step "benchmark: eager baseline vs the trainer path"
    local args=(--out "$OUT/bench.json")
    if [[ "$CPU_MODE" == 1 ]]; then
        args+=(--size tiny --precision fp32 --steps 3 --warmup 1 --no-compile)
    else
        args+=(--size base --batch 128 --image-size 224 --text-len 40 --precision bf16 --compile --steps 20 --warmup 5)
    fi
    "$PY" tools/bench/train.py "${args[@]}" | tee "$OUT/bench.txt"
    step "eager vs compiled losses"
    "$PY" - "$OUT/bench.json" <<'EOF'
import json, sys
bench = json.load(open(sys.argv[1]))
eager, compiled = bench["results"][0]["losses"], bench["results"][1]["losses"]
# Same weights and batches; compiled kernels and fused AdamW round differently, so the gap may grow a little per step.
tolerance = 1e-3 if bench["args"]["precision"] == "fp32" else 2e-2
worst = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(eager, compiled))
first = abs(eager[0] - compiled[0]) / max(1.0, abs(eager[0]))
print(f"eager  {[round(x, 4) for x in eager]}\ncompiled {[round(x, 4) for x in compiled]}")
print(f"relative gap: first step {first:.2e}, worst step {worst:.2e} (tolerance {tolerance:g} first, {5 * tolerance:g} any)")
assert first <= tolerance and worst <= 5 * tolerance, "eager and compiled losses disagree"
EOF
}

table() {
    step "summary"
    "$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
bench = json.loads((out / "bench.json").read_text())
a = bench["args"]
print(f"GPU check on {bench['device']}: size {a['size']}, batch {a['batch']}, {a['image_size']}px, text {a['text_len']}, "
      f"{a['precision']}, {bench['flops_per_sample'] / 1e9:.1f} GFLOP/sample (fwd+bwd)\n")
print("| contender | samples/s | x eager | TFLOP/s | MFU | peak GB |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
base = bench["results"][0]["samples_per_s"]
for r in bench["results"]:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
    print(f"| {r['name']} | {r['samples_per_s']:.0f} | {r['samples_per_s'] / base:.2f} | {r['tflops']:.1f} | {mfu} | {memory} |")
print()
for path in sorted(out.glob("trainer_*.json")):
    result = json.loads(path.read_text())
    t = result["throughput"]
    print(f"- trainer {result['precision']['precision']} (tiny, {result['steps']} steps): final loss {result['final']['loss/loss']:.3f}, "
          f"{result['precision']['skipped_steps']} skipped steps, {t['samples_per_s']:.0f} samples/s")
EOF
}

SECONDS=0
install
trainer_runs
bench
table
echo "GPU check passed in ${SECONDS} s; outputs in $OUT"
