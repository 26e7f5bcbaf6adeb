"""Job files written carelessly or by an attacker: every one ends in one
SpecError paragraph naming the file, quickly, and nothing is written
outside the run directory."""

from __future__ import annotations

import time

import pytest

from vlcluster.graph import build_graph
from vlcluster.errors import SpecError
from vlcluster.jobspec.load import load_pipeline
from vlcluster.jobspec.names import directory_name
from vlcluster.stages.rundir import stage_dir

DATA = "{kind: data, n_train: 100, n_val: 10, shard_size: 50}"


def spec_error(path, overrides=()) -> str:
    with pytest.raises(SpecError) as info:
        build_graph(load_pipeline(path, list(overrides)), str(path))
    message = str(info.value)
    assert message.startswith(str(path)), message
    return message


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "$(touch pwned)", "-rf", "x y", "", "é"])
def test_stage_names_are_plain_words(write_job, name):
    path = write_job(f"name: t\nstages:\n  {name!r}: {DATA}\n")
    assert "is not a valid name" in spec_error(path) or "must be a string" in spec_error(path)


@pytest.mark.parametrize("name", ["../../etc/cron.d", "..", "a b", "$(id)"])
def test_pipeline_name_is_a_plain_word(write_job, name):
    path = write_job(f"name: {name!r}\nstages:\n  data: {DATA}\n")
    assert "name:" in spec_error(path)


def test_sweep_value_cannot_leave_the_run_dir(write_job, tmp_path):
    path = write_job(
        f"""
        name: t
        stages:
          data: {DATA}
          seed:
            kind: pretrain
            data: {{from: data}}
            train: {{steps: 2, batch_size: 8}}
            sweep: {{model.size: [tiny], data.tokenizer: ["/../../../../tmp/x", "a/../../b"]}}
        """
    )
    with pytest.raises(SpecError):  # tokenizer and data.from are exclusive; the names are still computed safely
        build_graph(load_pipeline(path), str(path))
    run_dir = tmp_path / "run"
    for element in ('seed[data.tokenizer="/../../../../tmp/x"]', 'seed[x="a/../../b"]', "seed[x=$(id)]"):
        directory = stage_dir(run_dir, element).root
        assert directory.parent == run_dir and directory.resolve().parent == run_dir.resolve()
        assert "/" not in directory.name and "$" not in directory.name


def test_readable_sweep_names_are_kept():
    assert directory_name("merge[alpha=0.25]") == "merge[alpha=0.25]"
    assert directory_name('merge[method="ties"]') == 'merge[method="ties"]'
    assert directory_name("a[x=1/2]") != directory_name("a[x=1_2]")  # the digest keeps them apart


def test_a_record_naming_a_stage_outside_is_confined(tmp_path):
    for name in ("..", ".", "../../x", "/etc", "a\\..\\b", ""):
        directory = stage_dir(tmp_path, name).root
        assert directory.parent == tmp_path and directory.name not in {"", ".", ".."}


ALIAS_BOMB = "\n".join(
    [
        'x-a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"x-{b}: &{b} [{','.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")),
        "name: bomb",
        f"stages: {{data: {DATA}}}",
    ]
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ALIAS_BOMB, "expands to more than"),
        ("name: t\nstages:\n  data: " + "[" * 500 + "]" * 500 + "\n", "nested too deeply"),
        ("name: t\nstages:\n  data: " + "{a: " * 300 + "1" + "}" * 300 + "\n", "nested too deeply"),
        (f"name: t\nstages:\n  data: {DATA}\n  data: {{kind: data}}\n", "appears twice in one mapping (line 3 and line 4)"),
        (f"name: t\nname: u\nstages:\n  data: {DATA}\n", "'name' appears twice"),
        ("name: t\nstages:\n  data: {kind: data, seed: " + "9" * 4301 + "}\n", "a value cannot be read"),
        ("name: t\nstages:\n  data: {kind: data, seed: " + str(2**63) + "}\n", "integer out of range"),
        ("name: t\nstages:\n  data: {kind: data, seed: -" + str(2**63 + 1) + "}\n", "integer out of range"),
        ("name: t\nx-pad: .nan\nstages:\n  data: {kind: data}\n", "x-pad: nan is not a finite number"),
    ],
)
def test_costly_or_ambiguous_documents_fail_fast(write_job, text, expected):
    path = write_job(text)
    started = time.perf_counter()
    assert expected in spec_error(path)
    assert time.perf_counter() - started < 20  # a bound against hangs, not a performance claim


def test_alias_bomb_is_small(write_job):
    assert len(ALIAS_BOMB.encode()) < 500


def test_invalid_utf8_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"name: t\xff\nstages: {}\n")
    assert "not UTF-8 text (invalid byte at offset 7)" in spec_error(path)


def test_unreadable_path_names_the_file(tmp_path):
    assert "cannot read job file" in spec_error(tmp_path)  # a directory


TRAIN = """
name: t
stages:
  data: {data}
  seed:
    kind: pretrain
    data: {{from: data}}
    train: {{steps: 2, batch_size: 8}}
  merge: {{kind: merge, source: seed, seed: seed, method: arithmetic}}
  metrics: {{kind: metrics, source: seed}}
"""


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("stages.seed.train.lr=.inf", "stages.seed.train.lr"),
        ("stages.seed.train.lr=-.inf", "stages.seed.train.lr"),
        ("stages.merge.lam=.inf", "stages.merge.lam"),
        ("stages.merge.gate={max: .nan}", "stages.merge.gate.max"),
        ("stages.seed.resources.mem_gb=.inf", "stages.seed.resources.mem_gb"),
        ("stages.seed.train.betas=[0.9, 1.0]", "stages.seed.train.betas[1]"),
        ("stages.seed.train.betas=[-0.1, 0.9]", "stages.seed.train.betas[0]"),
        ("stages.seed.train.steps=true", "stages.seed.train.steps"),
        ("stages.seed.train.steps='10'", "stages.seed.train.steps"),
        ("stages.seed.train.seed=9223372036854775808", "stages.seed.train.seed"),
        ("stages.merge.alpha=.nan", "stages.merge.alpha"),
    ],
)
def test_numbers_are_strict(write_job, override, field):
    path = write_job(TRAIN.format(data=DATA))
    build_graph(load_pipeline(path), str(path))  # the file itself is fine
    assert field in spec_error(path, [override])


def test_betas_in_range_and_ints_for_floats_still_load(write_job):
    path = write_job(TRAIN.format(data=DATA))
    pipeline = load_pipeline(path, ["stages.seed.train.betas=[0, 0.999]", "stages.seed.train.lr=1"])
    assert pipeline.stages["seed"].train.betas == (0.0, 0.999)
    assert pipeline.stages["seed"].train.lr == 1.0


def test_sweep_size_is_capped(write_job):
    values = list(range(40))
    path = write_job(
        f"name: t\nstages:\n  data: {DATA}\n  seed:\n    kind: pretrain\n    data: {{from: data}}\n"
        f"    train: {{steps: 2, batch_size: 8}}\n"
        f"    sweep: {{train.seed: {values}, train.steps: {[v + 1 for v in values]}, "
        f"train.warmup_steps: {values}, train.log_every: {[v + 1 for v in values]}}}\n"
    )
    started = time.perf_counter()
    assert "the sweeps expand to 2560001 stages (at most 1000)" in spec_error(path)
    assert time.perf_counter() - started < 20  # a bound against hangs, not a performance claim


@pytest.mark.parametrize(("data", "field"), [
    ("{val: 's-{0..99999999}.tar'}", "stages.ev.data.val"),
    ("{train: ['a.tar', 's-{0..9}{0..999999}.tar']}", "stages.ev.data.train"),
    ("{train: [{shards: 's-{0..99999999}.tar', weight: 1}]}", "stages.ev.data.train.list[SourceSpec][0].shards"),
])
def test_huge_brace_ranges_are_refused_at_load_naming_the_file_and_field(write_job, data, field):
    path = write_job(f"name: t\nstages:\n  ev: {{kind: pretrain, data: {data}, train: {{steps: 1}}}}\n")
    started = time.perf_counter()
    message = spec_error(path)
    assert time.perf_counter() - started < 20  # counted, never expanded: a bound against hangs, not a performance claim
    assert f"{field}: Value error, " in message and "shard URLs (at most 1000000)" in message


def test_plan_does_not_glob(write_job, tmp_path):
    from vlcluster.plan import check_inputs

    path = write_job(
        f"name: t\nstages:\n  ev:\n    kind: eval\n    source: m\n"
        f"    data: {{val: '{tmp_path}/s-{{0..3}}.tar', tokenizer: /**/*.json}}\n"
        f"  m: {{kind: merge, source: p}}\n  p: {{kind: pretrain, data: {{train: '/**/*.tar'}}, train: {{steps: 1, batch_size: 8}}}}\n"
    )
    graph = build_graph(load_pipeline(path), str(path))
    with pytest.raises(SpecError) as info:
        check_inputs(graph, str(path), include_remote=False)
    message = str(info.value)
    assert message.startswith(str(path)) and "stages.ev.data.val: 4 of 4 shard files missing" in message
    assert "/**/*.tar" not in message  # globs are listed by submit, not plan


@pytest.mark.parametrize(("sweep", "expected"), [
    # a stage's own sweep through a scalar, a list, and a field that is not there
    ("  seed.sweep: {train.steps.x: [1]}", "stages.seed.sweep.train.steps.x: train.steps holds the value 2, not a mapping, "
                                           "so 'train.steps.x' cannot be set inside it"),
    ("  seed.sweep: {train.betas.0: [0.5]}", "stages.seed.sweep.train.betas.0: train.betas holds a list, not a mapping"),
    ("  seed.sweep: {train.nothing.x: [1]}", "stages.seed[train.nothing.x=1].train.nothing: unknown key"),
    # the pipeline's sweep, the same three ways
    ("sweep: {product: {stages.seed.train.steps.x: [1]}}",
     "sweep.product.stages.seed.train.steps.x: in stages.seed, train.steps holds the value 2, not a mapping"),
    ("sweep: {zip: {stages.seed.train.betas.0: [0.5]}}", "sweep.zip.stages.seed.train.betas.0: in stages.seed, train.betas holds a list"),
    ("sweep: {product: {stages.seed.train.nothing.x: [1]}}",
     "sweep.product.stages.seed.train.nothing.x[0]: 1 gives stages.seed.train.nothing: unknown field"),
])
def test_sweep_keys_through_values_name_the_file_and_field(write_job, sweep, expected):
    seed = "{kind: pretrain, data: {from: data}, train: {steps: 2, betas: [0.9, 0.98]}}"
    if sweep.startswith("  seed.sweep: "):
        text = f"name: t\nstages:\n  data: {DATA}\n  seed: {seed[:-1]}, sweep: {sweep.split(': ', 1)[1]}}}\n"
    else:
        text = f"name: t\n{sweep}\nstages:\n  data: {DATA}\n  seed: {seed}\n"
    assert expected in spec_error(write_job(text))
