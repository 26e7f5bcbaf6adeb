"""The docs site: it builds strictly, its generated reference is current, and
every `vlcluster` command it shows parses (and, after a whole-suite run, was
run by a test: tests/conftest.py with tests/support/docs_commands.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.docs_commands import (
    DocCommand, ParseFailure, commands_in, documented_commands, documented_shape, recorded_shapes, shape, unrun_commands,
)

REPO = Path(__file__).resolve().parents[2]


def gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "tools" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mkdocs_build_is_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")  # mkdocs-material, in the test extra
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(site)],
                            capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "vlcluster submit" in cli and "--backend" in cli
    assert (site / "results" / "study" / "k_seed.png").is_file()  # the study's figures travel with the page


def test_reference_pages_are_current():
    stale = gen_docs().stale_pages()
    assert not stale, f"{[str(p.relative_to(REPO)) for p in stale]} out of date: run python tools/gen_docs.py"


def test_reference_covers_every_command_and_model():
    from vlcluster.cli import build_parser
    from vlcluster.jobspec.pipeline import Pipeline
    from vlcluster.merge.methods import METHOD_NAMES

    cli = (REPO / "docs" / "reference" / "cli.md").read_text()
    commands = next(a.choices for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert all(f"## `vlcluster {name}`" in cli for name in commands)
    assert f"`--method {{{','.join(METHOD_NAMES)}}}`" in cli
    schema = (REPO / "docs" / "reference" / "job-schema.md").read_text()
    for field in Pipeline.model_fields:
        assert f"| `{field}` |" in schema
    assert "## ClusterProfile" in schema and "| `signal_delay_s` | int ≥ 10 | `120` |" in schema


def test_every_documented_command_parses():
    """A misspelt flag or subcommand in the README or a docs page fails here,
    on every run, without running anything."""
    commands = documented_commands()
    assert len(commands) > 40 and {c.page for c in commands} >= {"README.md", "docs/guide/slurm.md"}
    failures = []
    for command in commands:
        try:
            documented_shape(command)
        except ParseFailure as exc:
            failures.append(f"{command.where()}: {exc}")
    assert not failures, "\n".join(failures)


def test_readme_links_point_at_files():
    readme = (REPO / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", readme) if not t.startswith(("http", "#"))]
    assert targets and all((REPO / target).exists() for target in targets), [t for t in targets if not (REPO / t).exists()]


PAGE = """\
    # A page

    Run `vlcluster submit FILE --backend slurm` or `vlcluster status` (a mention),
    not `vlcluster render FILE [-o DIR]` (a synopsis).

    ```bash
    vlcluster merge runs/q/vlpt -o merged/ --method ties \\
        --base runs/q/seed --lam 1   # a comment --method dare
    pip install -e . && vlcluster schema | head
    kubectl apply -f manifests/
    ```

    ```yaml
    command: vlcluster data out/      # not shell
    ```
"""


def test_commands_are_found_in_blocks_and_inline_spans(tmp_path):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text(textwrap.dedent(PAGE))
    found = [(c.line, c.text, c.inline) for c in commands_in(page, tmp_path)]
    assert found == [
        (3, "vlcluster submit FILE --backend slurm", True),
        (3, "vlcluster status", True),
        (7, "vlcluster merge runs/q/vlpt -o merged/ --method ties --base runs/q/seed --lam 1", False),
        (9, "vlcluster schema", False),
    ]


def test_shapes_keep_choices_and_flags_not_values():
    ties = shape(["merge", "a", "-o", "b", "--method", "ties", "--base", "s", "--lam", "1"])
    assert ties.command == ("merge",) and ties.flags == {"--out", "--base", "--lam"}
    assert "--method=ties" in ties.choices
    docs = shape(["merge", "x", "-o", "y", "--method", "ties"])
    assert docs.covered_by(ties)  # the test gave more flags
    assert not docs.covered_by(shape(["merge", "x", "-o", "y", "--method", "dare"]))
    assert not shape(["merge", "x", "-o", "y", "--method", "ties", "--density", "0.3"]).covered_by(ties)
    local = shape(["submit", "jobs/quickstart.yaml"])  # the default backend is part of the shape
    assert not local.covered_by(shape(["submit", "f.yaml", "--backend", "slurm", "--run-dir", "r"]))
    assert local.covered_by(shape(["submit", "f.yaml", "--run-dir", "r", "--set", "a=1"]))
    assert shape(["import", "vqa2", "--questions", "q", "--annotations", "a", "--images", "i", "-o", "o"]).command == ("import", "vqa2")
    with pytest.raises(ParseFailure, match="unrecognized arguments: --alpah"):
        shape(["merge", "x", "-o", "y", "--alpah", "0.5"])
    with pytest.raises(ParseFailure):  # an inline mention may leave out arguments, not misspell a flag
        documented_shape(DocCommand("p.md", 1, "vlcluster merge --alpah nan", inline=True))
    assert documented_shape(DocCommand("p.md", 1, "vlcluster merge --alpha nan", inline=True)) is None


def test_unrun_commands_are_named_by_page_and_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("```bash\nvlcluster schema\nvlcluster data out/ --n-train 10\n```\n")
    (tmp_path / "docs" / "a.md").write_text("See `vlcluster submit f.yaml --backend slurm`.\n")
    record = tmp_path / "record.jsonl"
    record.write_text("\n".join(json.dumps(entry) for entry in [
        {"argv": ["schema"], "code": 0},
        {"argv": ["data", "o", "--n-train", "4"], "code": 2},  # failed: does not count
        {"argv": ["submit", "f.yaml"], "code": 0},  # the local backend: not the slurm command
    ]) + "\n{\"argv\": [\"da")  # a line cut short by a killed process
    assert len(recorded_shapes(record)) == 2
    missing = unrun_commands(record, tmp_path)
    assert [line.split("  (")[0] for line in missing] == [
        "README.md:3: vlcluster data out/ --n-train 10",
        "docs/a.md:1: vlcluster submit f.yaml --backend slurm",
    ]


def test_cli_main_records_each_invocation_with_its_exit_status(tmp_path, monkeypatch, capsys):
    from vlcluster.cli import main
    from vlcluster.clirecord import ENV

    record = tmp_path / "record.jsonl"
    monkeypatch.setenv(ENV, str(record))
    assert main(["schema"]) == 0
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    monkeypatch.delenv(ENV)
    assert main(["schema"]) == 0  # unset: nothing written
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert entries == [{"argv": ["schema"], "code": 0}, {"argv": ["plan", str(tmp_path / "missing.yaml")], "code": 2}]


@pytest.mark.parametrize(("page", "first_line", "model"), [
    ("docs/guide/first-cluster-run.md", "name: seed_mylab", "vlcluster.jobspec.pipeline:Pipeline"),
    ("docs/guide/slurm.md", "# slurm/a100.yaml", "vlcluster.jobspec.models:ClusterProfile"),
])
def test_complete_yaml_examples_validate(page, first_line, model):
    """The examples a reader copies whole (the others are marked fragments)."""
    import yaml

    from vlcluster.stages.kinds import named

    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / page).read_text(), re.S)
    [block] = [b for b in blocks if b.startswith(first_line)]
    named(model).model_validate(yaml.safe_load(block))


def test_readme_stays_a_front_page():
    """At most 200 lines (everything else lives in docs/), and its test command
    is the one .ci/run runs."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("python3 -m venv .venv") and ci_command in readme.splitlines()
