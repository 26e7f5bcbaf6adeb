"""Property-based fuzzing of everything that reads a file a user or a run
directory hands to vlcluster: the job-file loader, ``plan``, ``status`` on a
run directory with damaged records, ``metrics`` and ``merge`` on damaged
safetensors files.

Run as a script (``python tests/support/fuzz_driver.py EXAMPLES OUT.json``) by
tests/faults/test_fuzz.py, in a child process with a memory cap; every example has
a 20 s alarm. An example ends as a clean error (SpecError / exit status 2
with one ``error:`` paragraph), an acceptance (checked for what acceptance
promises), a traceback (an exception escaping) or a hang (the alarm).
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import struct
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vlcluster.cli import main as cli_main  # noqa: E402
from vlcluster.errors import SpecError  # noqa: E402
from vlcluster.graph import build_graph  # noqa: E402
from vlcluster.jobspec.load import load_pipeline  # noqa: E402
from vlcluster.jobspec.names import NAME  # noqa: E402
from vlcluster.stages.rundir import stage_dir  # noqa: E402

EXAMPLE_TIMEOUT_S = 20
COUNTS: dict[str, Counter] = {}
FAILURES: list[dict] = []


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def record(target: str, run) -> None:
    """Run one example; classify how it ended."""
    counts = COUNTS.setdefault(target, Counter())
    counts["tried"] += 1
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, EXAMPLE_TIMEOUT_S)
    try:
        outcome = run()
    except Hang:
        counts["hangs"] += 1
        FAILURES.append({"target": target, "hang": True})
        return
    except BaseException as exc:  # noqa: BLE001 - anything escaping is the finding
        counts["tracebacks"] += 1
        FAILURES.append({"target": target, "traceback": traceback.format_exception(exc)[-3:]})
        return
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    counts[outcome] += 1


# ---- job files ---------------------------------------------------------------

BASE = {
    "name": "fuzz",
    "x-train": {"steps": 2, "batch_size": 8},
    "stages": {
        "data": {"kind": "data", "n_train": 100, "n_val": 10, "shard_size": 50},
        "seed": {"kind": "pretrain", "data": {"from": "data"}, "train": {"steps": 2, "batch_size": 8}},
        "merge": {"kind": "merge", "source": "seed", "alpha": 0.5},
        "metrics": {"kind": "metrics", "source": "seed"},
    },
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["../../x", "..", "$(id)", "a b", "data", "seed", ".inf", "s3://u:p@b/x", "{0..99999999}", "/**/*.tar"]),
)
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
paths = st.lists(st.sampled_from(["name", "stages", "data", "seed", "merge", "metrics", "train", "steps", "lr", "alpha",
                                  "kind", "sweep", "model", "resources", "n_train", "x-train", "betas", "gate", "max"]),
                 min_size=1, max_size=4)


# Sweep keys: a path to a value or a list the stage holds (``train.steps``,
# ``train.betas``), to a field it lacks or its model does not have, or a known
# sweepable field; then deeper keys that run through it (``train.steps.x``).
def leaf_paths(node: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        paths += leaf_paths(value, path + ".") if isinstance(value, dict) else [path]
    return paths


def sweep_base() -> dict:
    """BASE with a list-valued field to run through."""
    document = json.loads(json.dumps(BASE))
    document["stages"]["seed"]["train"]["betas"] = [0.9, 0.98]
    return document


HELD = {name: [path for path in leaf_paths(stage) if path != "kind"] for name, stage in sweep_base()["stages"].items()}
THROUGH_VALUE = [(name, path) for name, paths in HELD.items() for path in paths if path != "train.betas"]
MISSING = ["nothing", "train.nothing", "checkpoint.every", "model.vl_layers", "init.from", "data.fields.image"]
# Fields a sweep may vary, with values that fit them: valid sweeps are reached too.
SWEEPABLE = [("merge", "alpha", st.floats(0, 1)), ("data", "n_train", st.integers(1, 500)), ("seed", "train.steps", st.integers(1, 5)),
             ("seed", "train.lr", st.floats(1e-5, 1e-2)), ("seed", "checkpoint.every", st.integers(1, 10))]
segments = st.sampled_from(["x", "0", "1", "steps", "from", "", "-1"])


def deeper(pairs: list[tuple[str, str]], min_tail: int) -> st.SearchStrategy:
    """(stage, path) from ``pairs`` with ``min_tail`` to 2 more keys below the path."""
    return st.tuples(st.sampled_from(pairs), st.lists(segments, min_size=min_tail, max_size=2)).map(
        lambda drawn: (drawn[0][0], ".".join([drawn[0][1], *drawn[1]])))


# A key through a value, through a list, or to a field that is not there.
sweep_keys = st.one_of(
    deeper(THROUGH_VALUE, 1), deeper([("seed", "train.betas")], 1),
    deeper([(stage, path) for stage in [*HELD, "nope"] for path in MISSING], 0),
)
sweep_values = st.one_of(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.lists(st.one_of(scalars, trees), max_size=3), scalars)
# (stage, key) and values: three in four of the keys above, one a sweepable field.
sweeps = st.one_of(
    st.tuples(sweep_keys, sweep_values), st.tuples(sweep_keys, sweep_values), st.tuples(sweep_keys, sweep_values),
    st.sampled_from(SWEEPABLE).flatmap(lambda field: st.tuples(st.just(field[:2]), st.lists(field[2], min_size=1, max_size=3))),
)


def with_sweep(where: str, stage: str, key: str, values) -> dict:
    """The sweep base with one swept key, in a stage's own sweep or the pipeline's."""
    document = sweep_base()
    if where == "stage":
        target = document["stages"].get(stage)
        if isinstance(target, dict):
            target["sweep"] = {key: values}
        else:
            document["stages"][stage] = {"sweep": {key: values}}  # a stage that is only a sweep
    else:
        document["sweep"] = {where: {f"stages.{stage}.{key}": values}}
    return document


def mutate(document: dict, path: list[str], value) -> dict:
    node = document
    for key in path[:-1]:
        child = node.get(key) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[path[-1]] = value
    return document


def yaml_text(document: dict, tweak: str) -> str:
    text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    if tweak == "alias":
        text = 'x-a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
            f"x-{b}: &{b} [{','.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh")
        ) + text
    elif tweak == "deep":
        text += "x-deep: " + "[" * 400 + "]" * 400 + "\n"
    elif tweak == "duplicate":
        text += "name: again\n"
    elif tweak == "comment":
        text = "# password: hunter2hunter2\n" + text
    return text


def check_accepted(graph, run_dir: Path) -> str:
    """What acceptance promises: plain names, finite numbers, directories inside the run dir."""
    pipeline = graph.pipeline
    assert NAME.match(pipeline.name), pipeline.name
    for name in graph.order:
        directory = stage_dir(run_dir, name).root
        assert directory.parent == run_dir and directory.name not in {".", ".."}, name
    dumped = json.dumps(pipeline.model_dump(mode="json"), allow_nan=True)
    assert "NaN" not in dumped and "Infinity" not in dumped
    return "accepted"


def spec_example(workdir: Path, text: str | bytes) -> str:
    path = workdir / "job.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        graph = build_graph(load_pipeline(path), str(path))
    except SpecError as exc:
        assert str(exc).startswith(str(path)), str(exc)[:200]
        return "clean_errors"
    return check_accepted(graph, workdir / "run")


def cli_example(args: list[str]) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(args)
    text = err.getvalue()
    assert "Traceback" not in text, text[-500:]
    if code == 0:
        return "accepted"
    assert code == 2 and text.count("error:") == 1, (code, text[-500:])
    return "clean_errors"


# ---- run directories -----------------------------------------------------------

RECORDS = ("pipeline.json", "seed/state.json", "seed/_SUCCESS", "seed/result.json", "merge/state.json",
           "seed/checkpoints/step_00000002/meta.json", "metrics/result.json")
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=10,
)
state_values = st.fixed_dictionaries(
    {}, optional={"state": st.one_of(st.sampled_from(["running", "failed", "done", "blocked"]), json_values),
                  "pid": st.one_of(st.integers(min_value=-(2**65), max_value=2**65), json_values),
                  "backend": st.one_of(st.just("local"), st.integers()),
                  "returncode": json_values, "started": json_values, "ended": json_values, "reason": json_values,
                  "gate": json_values, "blocked_by": json_values, "spec_hash": json_values},
)


def make_run_dir(workdir: Path) -> Path:
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False))
    run_dir = workdir / "run"
    from vlcluster.stages.context import save_pipeline

    save_pipeline(run_dir, build_graph(load_pipeline(path), str(path)))
    return run_dir


# ---- safetensors ---------------------------------------------------------------


def valid_safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    from vlcluster.model.config import preset
    from vlcluster.model.multiway import MultiwayTransformer

    config = preset("tiny", "specific", dim=16, depth=2, heads=2, vl_layers=1, vocab_size=50, max_text_len=8, image_size=16, patch_size=8)
    torch.manual_seed(0)
    state = MultiwayTransformer(config).state_dict()
    return save({k: v.contiguous() for k, v in state.items()}), config


def damaged(blob: bytes, mode: str, position: int, value: int, header: object) -> bytes:
    if mode == "truncate":
        return blob[: position % (len(blob) + 1)]
    if mode == "flip":
        data = bytearray(blob)
        data[position % len(data)] ^= value or 1
        return bytes(data)
    if mode == "length":
        return struct.pack("<Q", value * 2**40 + position) + blob[8:]
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + blob[8 + struct.unpack("<Q", blob[:8])[0]:]


def run(examples: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="vlcluster-fuzz-"))
    common = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                      suppress_health_check=list(HealthCheck))

    @common
    @given(path=paths, value=trees, change=st.booleans(),
           tweak=st.sampled_from(["", "", "", "alias", "deep", "duplicate", "comment"]))
    def fuzz_spec(path, value, change, tweak):
        document = json.loads(json.dumps(BASE))
        if change:
            mutate(document, path, value)
        record("spec", lambda: spec_example(workdir, yaml_text(document, tweak)))

    @common
    @given(where=st.sampled_from(["stage", "zip", "product"]), sweep=sweeps)
    def fuzz_sweep(where, sweep):
        (stage, key), values = sweep
        document = with_sweep(where, stage, key, values)
        record("sweep", lambda: spec_example(workdir, yaml.safe_dump(document, sort_keys=False, allow_unicode=True)))

    @common
    @given(data=st.binary(max_size=400) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
    def fuzz_spec_bytes(data):
        record("spec-bytes", lambda: spec_example(workdir, data))

    @common
    @given(path=paths, value=trees)
    def fuzz_plan(path, value):
        document = mutate(json.loads(json.dumps(BASE)), path, value)
        job = workdir / "plan.yaml"
        job.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
        record("plan", lambda: cli_example(["plan", str(job), "--run-dir", str(workdir / "plan-run")]))

    run_dir = make_run_dir(workdir)
    pristine = {name: (run_dir / name).read_bytes() for name in ("pipeline.json",)}

    @common
    @given(which=st.lists(st.sampled_from(RECORDS), min_size=1, max_size=4, unique=True),
           values=st.lists(st.one_of(state_values, json_values, st.binary(max_size=40)), min_size=4, max_size=4))
    def fuzz_status(which, values):
        (run_dir / "pipeline.json").write_bytes(pristine["pipeline.json"])
        for name, value in zip(which, values):
            target = run_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(value if isinstance(value, bytes) else json.dumps(value).encode())
        record("status", lambda: cli_example(["status", str(run_dir)]))

    blob, config = valid_safetensors()
    model_dir = workdir / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text(json.dumps({"config": config.to_dict(), "provenance": {}}))

    @common
    @given(mode=st.sampled_from(["truncate", "flip", "length", "header"]), position=st.integers(0, 2**20),
           value=st.integers(0, 255), header=json_values, command=st.sampled_from(["metrics", "merge"]))
    def fuzz_tensors(mode, position, value, header, command):
        (model_dir / "model.safetensors").write_bytes(damaged(blob, mode, position, value, header))
        args = ["metrics", str(model_dir)] if command == "metrics" else ["merge", str(model_dir), "-o", str(workdir / "out")]
        record(command, lambda: cli_example(args))

    for fuzz in (fuzz_spec, fuzz_sweep, fuzz_spec_bytes, fuzz_plan, fuzz_status, fuzz_tensors):
        fuzz()
    totals = Counter()
    for counts in COUNTS.values():
        totals.update(counts)
    return {"targets": {k: dict(v) for k, v in COUNTS.items()}, "total": dict(totals), "failures": FAILURES[:20]}


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)  # damaged records are logged as warnings; the counts are the output
    summary = run(int(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(summary["total"]))
