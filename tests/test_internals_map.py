"""docs/INTERNALS.md is a map of src/cellscale: it names every module, and everything it names exists.

Paths in backticks are relative to ``src/cellscale`` (`rules/plateau.py`), or to the repository
root when they start with one of its top-level folders (`tests/conftest.py`). A module added without
a line in the map, or a path the map still names after a move, fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

from cellscale.schema import RESULT_FIELDS

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "cellscale"
DOC = ROOT / "docs" / "INTERNALS.md"
TEXT = DOC.read_text(encoding="utf-8")
# the repository's top-level folders (tests/, benchmarks/, ...) that are no room of the package: a path
# starting with one is the repository's, any other the package's
REPO_DIRS = ({p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
             - {p.name for p in PACKAGE.iterdir() if p.is_dir()})


def package_modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def named_paths() -> set[str]:
    """Every backticked path ending in .py the document names."""
    return set(re.findall(r"`([\w./-]+\.py)`", TEXT))


def resolve(path: str) -> Path:
    return ROOT / path if path.split("/", 1)[0] in REPO_DIRS else PACKAGE / path


def test_every_module_is_on_the_map():
    modules = package_modules()
    assert len(modules) > 50, modules  # the walk found the package
    missing = [m for m in modules if f"`{m}`" not in TEXT]
    assert not missing, f"docs/INTERNALS.md does not name {missing}: add a row to 'Every module'"


def test_every_module_has_a_row_in_the_table():
    table = TEXT.split("## Every module", 1)[1]
    rows = re.findall(r"^\| `([\w./-]+\.py)` \|", table, re.MULTILINE)
    assert sorted(rows) == package_modules()


def test_every_named_path_exists():
    paths = named_paths()
    assert paths
    stale = sorted(p for p in paths if not resolve(p).is_file())
    assert not stale, f"docs/INTERNALS.md names {stale}, which do not exist"


def test_results_columns_are_the_schema_order():
    """The results.csv column list is schema.RESULT_FIELDS, in order."""
    after = TEXT.split("`results.csv` columns", 1)[1]
    block = re.search(r"^```[^\n]*\n(.*?)^```", after, re.DOTALL | re.MULTILINE).group(1)
    assert tuple(re.findall(r"\w+", block)) == RESULT_FIELDS


def test_every_metrics_kind_is_named():
    """Each kind of metrics.jsonl line the trainer writes (train/, runtime/) is described."""
    kinds = set()
    for path in [*(PACKAGE / "train").rglob("*.py"), *(PACKAGE / "runtime").rglob("*.py")]:
        kinds |= set(re.findall(r'"kind": "(\w+)"', path.read_text(encoding="utf-8")))
    assert {"train", "eval"} <= kinds
    missing = sorted(k for k in kinds if f'{{"kind": "{k}"' not in TEXT)
    assert not missing, f"docs/INTERNALS.md does not describe metrics.jsonl lines of kind {missing}"
