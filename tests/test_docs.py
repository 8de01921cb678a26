"""Every `cellscale ...` command in the README and docs/*.md is checked against the real parser.

Command lines in fenced code blocks are parsed with ``cellscale.cli.build_parser()`` (so a
documented option that does not exist, a wrong choice or a missing required option fails),
after placeholders such as ``DATASET_DIR`` or ``<...>`` are replaced by concrete values (a
placeholder this file does not know fails the test: add it to PLACEHOLDERS). The cheap ones are
run for real: ``--version``, ``ladder``, ``run --list-presets``, ``data info`` (on the tiny
dataset). Inline spans (`cellscale sweep --backend ray`) are checked option by option.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from cellscale.cli import build_parser, main

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SIZES = {"XXS", "TINY", "XS", "S", "M", "L", "XL"}  # real values that look like placeholders
# synopsis notation -> one concrete reading (regex, replacement), applied in order
SYNTAX = [
    (r"\[--preset NAME \| --config YAML\]", "--preset demo"),
    (r"\{simulate,h5ad,census\} \.\.\.", "simulate"),
    (r"\{([\w-]+)(?:,[\w-]+)+\}", r"\1"),      # {local,ray} -> local
    (r"\[([^\[\]]*)\]", r"\1"),                # optional groups are included
    (r"--size NAME", "--size XS"),
    (r"--preset NAME", "--preset demo"),
    (r"--layer NAME", "--layer counts"),
]
# placeholder words -> concrete values
PLACEHOLDERS = {
    "V": "512", "D": "10000", "N": "1000", "DATASET_DIR": "ds", "RUN_DIR": "runs/xs",
    "SWEEP_DIR": "sweep", "CONFIG.yaml": "src/cellscale/presets/demo.yaml", "RESULTS.csv": "sweep/results.csv",
    "YAML": "my-study.yaml", "DIR": "out", "<command>": "run", "<dir>": "ds", "F": "0.5", "SEED": "0",
}


def _blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def _invocation(tokens: list[str]) -> list[str] | None:
    """The cellscale arguments of one shell command, or None when it is not cellscale."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # VAR=value prefixes
    if tokens and Path(tokens[0]).name == "cellscale":
        return tokens[1:]
    if "-m" in tokens:
        i = tokens.index("-m")
        if i + 1 < len(tokens) and tokens[i + 1] == "cellscale.cli":
            return tokens[i + 2:]
    return None


def _concrete(line: str) -> list[str]:
    for pattern, repl in SYNTAX:
        line = re.sub(pattern, repl, line)
    tokens = shlex.split(line, comments=True)
    return [PLACEHOLDERS.get(t, t) for t in tokens]


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(doc name, original line, concrete cellscale argv) for every command in a code block."""
    out = []
    for doc in DOCS:
        for block in _blocks(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"^\s*\$\s+", "", line).strip()
                for part in re.split(r"\s(?:&&|\|\||;)\s", line):
                    if "cellscale" not in part or part.startswith("#"):
                        continue
                    argv = _invocation(_concrete(part))
                    if argv is not None:
                        out.append((doc.name, part, argv))
    return out


COMMANDS = documented_commands()


def _parse(argv: list[str]) -> argparse.Namespace | None:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as err:
        if err.code == 0:  # --help / --version
            return None
        raise AssertionError(f"argparse refused it (exit {err.code})") from None


def test_docs_show_commands():
    docs = {doc for doc, _, _ in COMMANDS}
    assert {"README.md", "census.md", "own-data.md", "ray-cluster.md", "entropy.md"} <= docs, docs
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("doc, line, argv", COMMANDS, ids=[f"{d}:{' '.join(a)[:60]}" for d, _, a in COMMANDS])
def test_documented_command_parses(doc, line, argv, capsys):
    left = [t for t in argv if t == "..." or (re.fullmatch(r"<[^>]*>|[A-Z][A-Z_]*(\.\w+)?", t) and t not in SIZES)]
    assert not left, f"{doc}: placeholder {left} in `{line}`: give it a value in tests/test_docs.py"
    try:
        _parse(argv)
    except AssertionError as err:
        pytest.fail(f"{doc}: `{line}` -> {argv}: {err}: {capsys.readouterr().err.strip()[-300:]}")


def _runnable(argv: list[str]) -> bool:
    if argv[:1] in (["--version"], ["--help"]):
        return True
    ns = _parse(argv)
    return ns.cmd == "ladder" or (ns.cmd == "run" and ns.list_presets) or (
        ns.cmd == "data" and ns.data_cmd == "info")


CHEAP = [(d, l, a) for d, l, a in COMMANDS if _runnable(a)]


def test_cheap_documented_commands_run(tiny_dataset_dir, capsys):
    kinds = set()
    for doc, line, argv in CHEAP:
        ns = _parse(argv)
        if ns is not None and ns.cmd == "data":  # the documented directory, played by the tiny dataset
            argv = [str(tiny_dataset_dir) if a == ns.dataset_dir else a for a in argv]
        try:
            rc = main(argv)
        except SystemExit as err:  # --version, --help
            rc = err.code
        out = capsys.readouterr()
        assert rc == 0, f"{doc}: `{line}` exited {rc}: {out.err[-500:]}"
        assert out.out.strip(), f"{doc}: `{line}` printed nothing"
        kinds.add("version" if ns is None else ns.cmd)
    assert {"version", "ladder", "run", "data"} <= kinds, kinds


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


INLINE = sorted({(doc.name, span) for doc in DOCS
                 for span in re.findall(r"`(cellscale [^`]+)`", re.sub(r"```.*?```", "", doc.read_text(), flags=re.DOTALL))})


@pytest.mark.parametrize("doc, span", INLINE)
def test_inline_commands_name_real_options(doc, span):
    """`cellscale sweep --backend ray` in prose: the subcommands and options exist."""
    tokens = _concrete(span)[1:]
    parser = build_parser()
    known = set(parser._option_string_actions)
    for tok in tokens:
        if tok.startswith("-"):
            name = tok.split("=", 1)[0]
            assert name in known or name in parser._option_string_actions, f"{doc}: `{span}`: no option {name}"
        elif tok in _subparsers(parser):
            parser = _subparsers(parser)[tok]


FILES_NAMED = [(d, a) for d, _, argv in COMMANDS for a in argv if a.startswith(("configs/", "src/", "docs/"))]


@pytest.mark.parametrize("doc, path", sorted(set(FILES_NAMED)))
def test_documented_repository_files_exist(doc, path):
    assert (ROOT / path).exists(), f"{doc} names {path}, which is not in the repository"
