"""Atomic file writes: a killed process never leaves a half-written result behind. Checked
reads: a file damaged after it was written (a full disk, a copy broken off, a hand edit) is
named in one line (:class:`DamagedFile`), never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from cellscale.errors import RunError


class DamagedFile(RunError):
    """A file cellscale wrote that no longer reads back as written: it fails to parse, or does
    not match the checksum recorded when it was written. The message names the file, what is
    wrong and (``fix``) what to do; ``path`` and ``problem`` are kept for callers that recover
    (fall back to an older copy, redo the work) instead of stopping. A RunError, so that under
    DDP rank 0's verdict on a run dir reaches every rank (``train.rundir.claim_shared``)."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str | None = None) -> None:
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path} is damaged ({problem})" + (f": {fix}" if fix else ""))

    def with_fix(self, fix: str) -> DamagedFile:
        """The same damage, with the fix that the caller's context calls for."""
        return DamagedFile(self.path, self.problem, fix)


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (for a one-line DamagedFile problem)."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def warn(text: str) -> None:
    """One line on stderr: damage that cellscale works around (an older checkpoint used, a run
    redone), so that it is never silent. Not muted by --quiet."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic(Path(path), lambda p: p.write_bytes(data))


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically produce ``path`` with ``writer(tmp_path)`` (e.g. safetensors.save_file)."""
    _atomic(Path(path), writer)


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy: NaN and inf become null (JSON has neither), numpy and torch scalars and
    arrays plain Python numbers and lists, paths strings, mapping keys strings."""
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy / torch scalars and arrays
        return jsonable(obj.tolist())
    return obj


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    return json.dumps(jsonable(obj), indent=indent, sort_keys=False)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, to_json(obj) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """The JSON-object lines of a ``.jsonl`` log (metrics.jsonl), and how many lines are damaged:
    unparseable (a process killed mid-write) or marked ``{"kind": "lost"}`` by a resume that found
    them so. Blank lines and lines that are not objects are skipped."""
    rows, bad = [], 0
    with Path(path).open(encoding="utf-8") as fh:
        for line in filter(None, (raw.strip() for raw in fh)):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict) and obj.get("kind") == "lost":
                bad += 1
            elif isinstance(obj, dict):
                rows.append(obj)
    return rows, bad


def read_json_checked(path: str | Path, *, fix: str | None = None, expect: type = dict,
                      keys: tuple[str, ...] = ()) -> Any:
    """``read_json`` of a file cellscale wrote: DamagedFile (naming it, with ``fix``) when it is
    not UTF-8 JSON, not an ``expect`` (a JSON object by default), or lacks one of ``keys``. A
    missing file is FileNotFoundError, as for any read."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise DamagedFile(path, f"not valid JSON: {first_line(err)}", fix) from None
    if not isinstance(obj, expect):
        raise DamagedFile(path, f"a JSON {type(obj).__name__}, not the {expect.__name__} cellscale writes", fix)
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DamagedFile(path, "no " + ", ".join(f"'{k}'" for k in missing), fix)
    return obj


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_digest(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys, no spaces): the same for the object that
    was written and the one read back, whatever the file's layout."""
    return sha256_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))


# ------------------------------------------------------------- text files with a checksum file
# A table such as results.csv can lose whole rows and still parse, so it carries a checksum in
# ``<name>.sha256.json``. The checksum file is written first and keeps the digest it replaces:
# a kill between the two writes leaves the old table, which still matches ("previous"), so an
# interrupted rewrite is never mistaken for damage.


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256.json")


def _recorded_digests(path: Path) -> tuple[str, ...] | None:
    """The digests ``path`` may have (its newest, and the one before it); None without a checksum
    file; DamagedFile when the checksum file itself is damaged."""
    side = checksum_path(path)
    if not side.is_file():
        return None
    doc = read_json_checked(side, keys=("sha256",), fix=f"delete it to use {path.name} as it is")
    return tuple(d for d in (doc.get("sha256"), doc.get("previous")) if isinstance(d, str))


def atomic_write_text_checked(path: str | Path, text: str) -> None:
    """``atomic_write_text`` and the checksum file that :func:`verify_checksum` reads."""
    path = Path(path)
    try:
        before = _recorded_digests(path)
    except DamagedFile:
        before = None
    atomic_write_json(checksum_path(path), {"sha256": sha256_text(text), "previous": before[0] if before else None})
    atomic_write_text(path, text)


def verify_checksum(path: str | Path, *, fix: str | None = None) -> None:
    """DamagedFile when ``path`` does not match the checksum recorded when cellscale wrote it
    (nothing to check for a file without one, e.g. a table made by hand)."""
    path = Path(path)
    digests = _recorded_digests(path)
    if digests is None:
        return
    try:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return
    if actual not in digests:
        side = checksum_path(path).name
        on_purpose = f"delete {side} if it was changed on purpose"
        raise DamagedFile(path, f"it differs from the checksum in {side}, recorded when cellscale wrote it",
                          f"{fix}, or {on_purpose}" if fix else on_purpose)
