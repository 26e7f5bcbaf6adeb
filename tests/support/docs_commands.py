"""The ``vlcluster`` commands shown in the docs, and whether the tests ran them.

Every fenced code block and every inline code span of ``README.md`` and
``docs/**/*.md`` that starts with ``vlcluster `` is a documented command
(generated reference pages excepted: they are written from the parser).
A command is reduced to its *shape*: the subcommand (``import`` with its
format), the option flags it gives (long spelling) and the value of every
option that has choices (``--backend slurm``, ``--method ties``, ``--from
beit``; defaults included, so ``submit`` without ``--backend`` is the local
backend). Paths, numbers and other values are not part of it: the tests run
the same command on their own small files.

A documented command is *run by the tests* when the test session recorded a
successful invocation (exit status 0; ``vlcluster/clirecord.py``) of the same
subcommand with the same choices and at least its flags (a test adds
``--run-dir`` and ``--set`` to keep its run small and inside its temporary
directory). ``tests/conftest.py`` does that check at the end of a whole-suite
run; ``tests/unit/test_docs.py`` checks on every run that each command parses.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("docs/reference/",)  # written from the parser by tools/gen_docs.py

# Documented commands no test can run, by (page, command text): none at present.
# Add one only with the reason, e.g. a command that needs a real GPU cluster.
EXEMPT: dict[tuple[str, str], str] = {}

SYNOPSIS = re.compile(r"[\[\]{}|…]|\.\.\.")  # `vlcluster render FILE [-o DIR] ...`: a usage line, not a command
INLINE = re.compile(r"(?<!`)`(vlcluster [^`\n]+)`(?!`)")


@dataclass(frozen=True)
class DocCommand:
    page: str
    line: int
    text: str
    inline: bool = False  # an inline code span, not a line of a shell block

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)[1:]

    def where(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


@dataclass(frozen=True)
class Shape:
    command: tuple[str, ...]
    flags: frozenset[str]
    choices: frozenset[str]

    def covered_by(self, ran: Shape) -> bool:
        return self.command == ran.command and self.choices == ran.choices and self.flags <= ran.flags

    def __str__(self) -> str:
        return " ".join(["vlcluster", *self.command, *sorted(self.flags), *sorted(self.choices)])


def doc_pages(repo: Path = REPO) -> list[Path]:
    pages = [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]
    return [page for page in pages if not str(page.relative_to(repo)).startswith(GENERATED)]


def shell_commands(code: str) -> list[str]:
    """The commands of a shell snippet: comments dropped, ``\\`` continuations
    joined, split at ``&&``, ``||``, ``;`` and ``|``."""
    words: list[str] = []
    lexer = shlex.shlex(code.replace("\\\n", " "), posix=False, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands, current = [], []
    for token in lexer:
        words.append(token)
        if token in {"&&", "||", ";", "|", "&", ";;"} or set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [" ".join(command) for command in commands if command]


def commands_in(page: Path, repo: Path = REPO) -> list[DocCommand]:
    """Every ``vlcluster`` command on a page, with its line number."""
    name = str(page.relative_to(repo))
    found: list[DocCommand] = []
    fence: str | None = None
    block: list[tuple[int, str]] = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence, block = stripped[3:].strip().lower(), []
            else:
                if fence in {"", "bash", "sh", "shell", "console"}:
                    found += block_commands(name, block)
                fence = None
            continue
        if fence is not None:
            block.append((number, line))
            continue
        for match in INLINE.finditer(line):
            text = match.group(1).strip()
            if not SYNOPSIS.search(text):
                found.append(DocCommand(name, number, text, inline=True))
    return found


def block_commands(page: str, block: list[tuple[int, str]]) -> list[DocCommand]:
    """Commands of a shell block; a command continued with ``\\`` counts at its first line."""
    found, index = [], 0
    while index < len(block):
        number, text = block[index]
        while text.rstrip().endswith("\\") and index + 1 < len(block):
            index += 1
            text = text.rstrip()[:-1] + " " + block[index][1].strip()
        index += 1
        found += [DocCommand(page, number, command) for command in shell_commands(text.strip().removeprefix("$ "))
                  if command.startswith("vlcluster ")]
    return found


def documented_commands(repo: Path = REPO) -> list[DocCommand]:
    return [command for page in doc_pages(repo) for command in commands_in(page, repo)]


class ParseFailure(ValueError):
    pass


@functools.lru_cache(maxsize=1)
def cli_parser() -> argparse.ArgumentParser:
    """The real ``vlcluster`` parser (parsing does not change it, so one serves every command)."""
    from vlcluster.cli import build_parser

    return build_parser()


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse with the real ``vlcluster`` parser, nothing run; a ParseFailure carries argparse's message."""
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message), contextlib.redirect_stdout(io.StringIO()):
            return cli_parser().parse_args(argv)
    except SystemExit:
        raise ParseFailure(message.getvalue().strip().splitlines()[-1] if message.getvalue().strip() else "no command") from None


def subparser_for(argv: list[str]) -> tuple[tuple[str, ...], argparse.ArgumentParser]:
    parser, path = cli_parser(), []
    for word in argv:
        children = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if children is None or word not in children:
            break
        parser = children[word]
        path.append(word)
    return tuple(path), parser


def shape(argv: list[str]) -> Shape:
    """A command's shape (see the module docstring); ParseFailure if it does not parse."""
    if argv == ["--version"]:  # argparse answers it by exiting, so it has no namespace
        return Shape((), frozenset({"--version"}), frozenset())
    namespace = parse(argv)
    path, parser = subparser_for(argv)
    options = parser._option_string_actions
    flags = set()
    for word in argv[len(path):]:
        if word == "--":
            break
        name = word.split("=", 1)[0]
        if name in options and options[name].choices is None:  # options with choices: by value, below
            flags.add(max(options[name].option_strings, key=len))
    choices = {
        f"{max(action.option_strings, key=len)}={getattr(namespace, action.dest)}"
        for action in parser._actions
        if action.option_strings and action.choices is not None and getattr(namespace, action.dest, None) is not None
    }
    return Shape(path, frozenset(flags), frozenset(choices))


def documented_shape(command: DocCommand) -> Shape | None:
    """The shape of a documented command; None for an inline mention of a
    command (`vlcluster status`, `vlcluster merge --alpha nan` in a sentence)
    that leaves out required arguments but whose flags all exist.
    ParseFailure for anything else that does not parse."""
    try:
        return shape(command.argv)
    except ParseFailure as exc:
        if not (command.inline and "arguments are required" in str(exc)):
            raise
        path, parser = subparser_for(command.argv)
        unknown = [word for word in command.argv[len(path):]
                   if word.startswith("-") and word.split("=", 1)[0] not in parser._option_string_actions]
        if unknown or not path:
            raise ParseFailure(f"unrecognized arguments: {' '.join(unknown)}" if unknown else str(exc)) from None
        return None


def recorded_shapes(record: Path) -> list[Shape]:
    """Shapes of the successful invocations in a ``$VLCLUSTER_RECORD_CLI`` file."""
    shapes = []
    if not record.is_file():
        return shapes
    for line in record.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a process killed mid-write
        if entry.get("code") != 0:
            continue
        try:
            shapes.append(shape(entry["argv"]))
        except (ParseFailure, KeyError, TypeError):
            continue
    return shapes


def unrun_commands(record: Path, repo: Path = REPO) -> list[str]:
    """Documented commands (not exempt) that no recorded successful invocation covers."""
    ran = set(recorded_shapes(record))
    missing = []
    for command in documented_commands(repo):
        if (command.page, command.text) in EXEMPT:
            continue
        try:
            wanted = documented_shape(command)
        except ParseFailure as exc:
            missing.append(f"{command.where()}  (does not parse: {exc})")
            continue
        if wanted is not None and not any(wanted.covered_by(one) for one in ran):
            missing.append(f"{command.where()}  (no test ran {wanted})")
    return missing
