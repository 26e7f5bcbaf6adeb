"""A copy of the ``vlcluster`` package to extend, as a new contributor would.

The extension tests (tests/e2e/test_extension.py) copy the package into a
temporary folder, add one module and one registry line there, check that
nothing else differs from the real package, and run the CLI on the copy in a
subprocess. What the copy needs beyond that one module and one line is what
adding such a thing costs: the test fails on it instead of the copy quietly
growing a second edit.
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "vlcluster"
IGNORED = ("__pycache__", "*.pyc")


def package_files(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every file of a package tree (no caches)."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


def diff_lines(before: Path, after: Path) -> list[str]:
    """The removed (``-``) and added (``+``) lines from ``before`` to ``after``."""
    diff = difflib.unified_diff(before.read_text().splitlines(), after.read_text().splitlines(), n=0, lineterm="")
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


@dataclass(frozen=True)
class PackageCopy:
    """``vlcluster/`` copied under ``root``; with ``root`` first on PYTHONPATH its
    subprocesses (the CLI, the stages it starts, torchrun's ranks) import the copy."""

    root: Path

    @property
    def package(self) -> Path:
        return self.root / "vlcluster"

    def add_module(self, where: str, text: str) -> Path:
        """A new file ``vlcluster/<where>``; refuses to overwrite one the package has."""
        path = self.package / where
        assert not path.exists(), f"vlcluster/{where} exists already: pick a new module name"
        path.write_text(text)
        return path

    def add_registry_line(self, where: str, opening: str, line: str) -> None:
        """``line`` as the first entry after the registry's ``opening`` line in ``vlcluster/<where>``."""
        path = self.package / where
        source = path.read_text()
        assert source.count(opening) == 1, f"vlcluster/{where}: the registry opening {opening!r} moved; update the test"
        path.write_text(source.replace(opening, f"{opening}\n    {line}"))

    def changes(self) -> tuple[list[str], dict[str, list[str]]]:
        """(files the copy adds, {changed file: its diff lines other than context}) against the real package."""
        original, copied = package_files(PACKAGE), package_files(self.package)
        assert not set(original) - set(copied), f"files missing from the copy: {sorted(set(original) - set(copied))}"
        added = sorted(set(copied) - set(original))
        changed = {}
        for name in sorted(set(original) & set(copied)):
            if original[name] != copied[name]:
                changed[name] = diff_lines(PACKAGE / name, self.package / name)
        return added, changed

    def assert_only(self, module: str, registry: str, line: str) -> None:
        """The copy differs from the package by exactly the new module and one added registry line."""
        added, changed = self.changes()
        assert added == [module], f"the copy adds {added}, expected only {module}"
        assert changed == {registry: [f"+    {line}"]}, f"the copy changes {changed}, expected one line added to {registry}"

    def env(self, **extra: str) -> dict[str, str]:
        # The real checkout stays importable through the editable install; the copy comes first.
        return {**os.environ, "PYTHONPATH": str(self.root), "COLUMNS": "400", **extra}

    def python(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """``python ARGS`` in the copy's root (so no other checkout sits on sys.path[0])."""
        return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=self.root,
                              env=self.env(), timeout=timeout)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.python("-m", "vlcluster.cli", *args, timeout=timeout)

    def regenerated_reference(self) -> dict[str, list[str]]:
        """The lines ``python tools/gen_docs.py`` changes in docs/reference when run on the
        copy ({page: removed and added lines}): the one step beside the new module and line
        (the generated pages list every registry's names; a test fails while they are stale)."""
        shutil.copytree(REPO / "docs" / "reference", self.root / "docs" / "reference")
        (self.root / "tools").mkdir()
        shutil.copy(REPO / "tools" / "gen_docs.py", self.root / "tools")  # it writes beside itself, from its checkout
        done = self.python("tools/gen_docs.py", timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return {page: diff_lines(REPO / "docs" / "reference" / page, self.root / "docs" / "reference" / page)
                for page in sorted(path.name for path in (REPO / "docs" / "reference").glob("*.md"))
                if (REPO / "docs" / "reference" / page).read_bytes() != (self.root / "docs" / "reference" / page).read_bytes()}

    def imported_package(self) -> Path:
        """The ``vlcluster`` a subprocess imports with this copy's environment."""
        done = self.python("-c", "import vlcluster; print(vlcluster.__file__)", timeout=60)
        assert done.returncode == 0, done.stderr
        return Path(done.stdout.strip()).parent


def copy_package(root: Path) -> PackageCopy:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(PACKAGE, root / "vlcluster", ignore=shutil.ignore_patterns(*IGNORED))
    return PackageCopy(root)


def extended_package(root: Path, module: str, text: str, registry: str, opening: str, line: str) -> PackageCopy:
    """The package copied under ``root`` with one new module ``vlcluster/<module>``
    and one ``line`` added to the registry that opens with ``opening`` in
    ``vlcluster/<registry>`` — and nothing else; subprocesses import the copy."""
    copy = copy_package(root)
    copy.add_module(module, text)
    copy.add_registry_line(registry, opening, line)
    copy.assert_only(module, registry, line)
    assert copy.imported_package() == copy.package, "a subprocess imported another vlcluster than the copy"
    return copy
