"""train.precision: selection against the device, fp16 loss scaling under
FSDP2 (agreement across ranks), and the scaler state in checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.support import REPO
from vlcluster.jobspec.models import TrainSpec
from vlcluster.train.precision import DeviceTraits, Precision, PrecisionError, resolve_precision

CPU = DeviceTraits("cpu", "cpu", None)
V100 = DeviceTraits("cuda", "Tesla V100-SXM2-32GB", (7, 0))
T4 = DeviceTraits("cuda", "Tesla T4", (7, 5))
A100 = DeviceTraits("cuda", "NVIDIA A100-SXM4-80GB", (8, 0))
H100 = DeviceTraits("cuda", "NVIDIA H100 80GB HBM3", (9, 0))


@pytest.mark.parametrize(
    "traits, expected",
    [(CPU, "fp32"), (V100, "fp16"), (T4, "fp16"), (A100, "bf16"), (H100, "bf16")],
)
def test_auto_picks_bf16_where_native_else_fp16_and_fp32_on_cpu(traits, expected):
    assert resolve_precision("auto", traits) == expected


@pytest.mark.parametrize("traits", [CPU, V100, A100, H100])
@pytest.mark.parametrize("requested", ["fp32", "fp16"])
def test_fp32_and_fp16_run_everywhere(traits, requested):
    assert resolve_precision(requested, traits) == requested


def test_bf16_on_a_v100_is_one_clear_paragraph():
    with pytest.raises(PrecisionError) as error:
        resolve_precision("bf16", V100)
    message = str(error.value)
    assert "Tesla V100-SXM2-32GB" in message and "compute capability 7.0" in message
    assert "fp16" in message and "\n" not in message
    assert resolve_precision("bf16", A100) == "bf16"
    assert resolve_precision("bf16", CPU) == "bf16"  # emulated but exact enough for tests


def test_spec_accepts_the_four_precisions_and_refuses_others():
    for name in ("fp32", "bf16", "fp16", "auto"):
        assert TrainSpec(steps=1, precision=name).precision == name
    with pytest.raises(ValueError):
        TrainSpec(steps=1, precision="fp8")


def test_the_running_device_resolves():
    assert Precision.for_device("auto", torch.device("cpu")).name == "fp32"


def _train(model, optimizer, precision, steps, overflow_at):
    for step in steps:
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        with precision.autocast():
            loss = model(x).float().pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss)
        if step == overflow_at:
            model[0].weight.grad[0, 0] = float("inf")
        precision.step(optimizer)


def _fresh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), Precision("fp16", torch.device("cpu"), distributed=False)


def test_fp16_skips_an_overflowing_step_and_resumes_exactly_from_saved_state():
    model, optimizer, precision = _fresh()
    _train(model, optimizer, precision, range(6), overflow_at=2)
    assert precision.skipped_steps == 1
    assert precision.loss_scale == 2.0**15  # halved once from torch's initial 2**16

    model2, optimizer2, precision2 = _fresh()
    _train(model2, optimizer2, precision2, range(3), overflow_at=2)
    saved = json.loads(json.dumps(precision2.state_dict()))  # what meta.json holds
    model_state = {k: v.clone() for k, v in model2.state_dict().items()}
    optim_state = optimizer2.state_dict()

    model3, optimizer3, precision3 = _fresh()
    model3.load_state_dict(model_state)
    optimizer3.load_state_dict(optim_state)
    precision3.load_state_dict(saved)
    assert precision3.loss_scale == 2.0**15 and precision3.skipped_steps == 1
    _train(model3, optimizer3, precision3, range(3, 6), overflow_at=None)
    for resumed, uninterrupted in zip(model3.parameters(), model.parameters()):
        assert torch.equal(resumed, uninterrupted)
    assert precision3.state_dict() == precision.state_dict()


def test_without_restoring_the_scale_the_resumed_run_differs():
    """The other side: the scaler state is what makes the resume exact."""
    model, optimizer, precision = _fresh()
    _train(model, optimizer, precision, range(6), overflow_at=2)
    model2, optimizer2, precision2 = _fresh()
    _train(model2, optimizer2, precision2, range(3), overflow_at=2)
    precision_fresh = Precision("fp16", torch.device("cpu"), distributed=False)  # scale 2**16 again
    _train(model2, optimizer2, precision_fresh, range(3, 6), overflow_at=None)
    assert precision_fresh.state_dict() != precision.state_dict()


def test_fp16_overflow_on_one_ranks_shard_skips_the_step_on_every_rank(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "support" / "precision_worker.py"), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    for record in ranks:
        assert record["compute_dtype"] == "torch.float16"  # FSDP2 computed in fp16
        assert [s["stepped"] for s in record["steps"]] == [True, False, True]
        assert [s["changed"] for s in record["steps"]] == [True, False, True]
        assert [s["scale"] for s in record["steps"]] == [2.0**16, 2.0**15, 2.0**15]
        assert record["skipped_steps"] == 1
