"""A run directory: who it belongs to (the run's identity hash), claiming it, and trimming its
metrics log back to a checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from cellscale import __version__
from cellscale.config import ModelConfig, TrainConfig, identity_dump
from cellscale.data.store import Dataset
from cellscale.errors import RunError
from cellscale.runtime.distributed import DistContext
from cellscale.runtime.io import DamagedFile, atomic_write_json, atomic_write_text, read_json_checked, warn
from cellscale.schema import FINISHED, RUN_REGISTRY


def run_identity(
    model_cfg: ModelConfig, train_cfg: TrainConfig, *, dataset: Dataset, train_cells: int | None, seed: int
) -> dict[str, Any]:
    return {
        "model": identity_dump("model", model_cfg),
        "train": identity_dump("train", train_cfg),
        "dataset_checksum": dataset.manifest.get("checksums", {}).get("values.npy"),
        "train_cells": train_cells,
        "seed": seed,
    }


def _stored_hash(config_path: Path, *, strict: bool = False) -> str | None:
    """The identity hash config.json records; None when it is damaged, or DamagedFile with
    ``strict``."""
    try:
        return read_json_checked(config_path, fix="choose another --out, or --overwrite to start the run over").get("hash")
    except DamagedFile:
        if strict:
            raise
        return None


def _damage(out: Path) -> DamagedFile | None:
    """What stops the run in ``out`` from going on: every checkpoint damaged, or the best
    weights (None when it can resume)."""
    from cellscale.runtime.checkpoint import checkpoint_damage, read_tensors

    damage = checkpoint_damage(out / "checkpoint")
    if damage is None and (out / "best.safetensors").is_file():
        try:
            read_tensors(out / "best.safetensors")
        except DamagedFile as err:
            damage = err
    return damage


def _clear_unless_same(out: Path, ident_hash: str) -> None:
    if out.exists() or out.is_symlink():
        config_path = out / "config.json"
        if config_path.is_file() and _stored_hash(config_path) == ident_hash:
            damage = _damage(out)  # the one case a run with the same settings is started over
            if damage is None:
                return
            warn(f"{damage.path} is damaged ({damage.problem}): --overwrite starts the run over")
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        else:
            out.unlink()


def claim_run_dir(
    out: Path, identity: dict[str, Any], ident_hash: str, *, overwrite: bool = False,
    registry: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Check ``out`` for this run: the finished result (returned), a resumable or new run
    (None, config.json written, and ``registry`` as registry.json: what embedding new cells with
    the run needs), or a RunError for a directory that holds something else (replaced instead when
    ``overwrite``)."""
    result_path = out / "result.json"
    config_path = out / "config.json"
    if overwrite:
        _clear_unless_same(out, ident_hash)
    if config_path.is_file():
        if _stored_hash(config_path, strict=True) != ident_hash:
            raise RunError(
                f"{out} holds a run with other settings; choose another --out, or --overwrite"
            )
        prev = finished_result(result_path)
        if prev is not None:
            return prev
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out} is not empty and holds no cellscale run; choose another --out, or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, {"hash": ident_hash, **identity, "cellscale_version": __version__})
    if registry is not None:
        atomic_write_json(out / RUN_REGISTRY, registry)
    return None


def finished_result(path: Path, *, quiet: bool = False) -> dict[str, Any] | None:
    """The result at ``path`` when it records a finished run; None when there is none, or it
    is damaged (the run is then redone: resumed from its checkpoint, or re-scored; one line
    says so, unless ``quiet``: a look ahead of the one that redoes it)."""
    if not path.is_file():
        return None
    try:
        result = read_json_checked(path, keys=("status",))
    except DamagedFile as err:
        if quiet:
            return None
        has_ckpt = any((path.parent / n).is_dir() for n in ("checkpoint", "checkpoint.old", "checkpoint.prev"))
        warn(f"{err}: the run is taken as unfinished and redone "
             + ("from its checkpoint" if has_ckpt else "from the start"))
        return None
    return result if result.get("status") in FINISHED else None


def claim_shared(out: Path, identity: dict[str, Any], ident_hash: str, *, overwrite: bool,
                 dist: DistContext, registry: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """:func:`claim_run_dir` under DDP: rank 0 alone inspects and claims the run dir, and every
    rank follows its verdict (the finished result, go on, or the same RunError)."""
    if not dist.active:
        return claim_run_dir(out, identity, ident_hash, overwrite=overwrite, registry=registry)
    verdict: tuple[str, Any] = ("go", None)
    if dist.is_main:
        try:
            prev = claim_run_dir(out, identity, ident_hash, overwrite=overwrite, registry=registry)
            verdict = ("done", prev) if prev is not None else ("go", None)
        except RunError as err:
            verdict = ("error", str(err))
    kind, payload = dist.broadcast_object(verdict)
    if kind == "error":
        raise RunError(payload)
    return payload


LOST_LINE = '{"kind": "lost"}\n'  # a metrics line found damaged on resume: the rest still line up


def _is_record(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def truncate_lines(path: Path, n: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone).

    The checkpoint counts ``n`` lines before it. Lines of those that are damaged (not JSON, or
    missing: cut short, or lost with the page cache) become ``{"kind": "lost"}``, so that the
    log keeps exactly ``n`` lines and the next resume cuts it at the right place; the learning
    curve loses those points (one line says so), the run goes on."""
    if not path.exists() and n == 0:
        return
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    except FileNotFoundError:
        lines = []
    kept = [ln if ln.endswith("\n") and _is_record(ln) else LOST_LINE for ln in lines[:n]]
    kept += [LOST_LINE] * (n - len(kept))
    lost = kept.count(LOST_LINE) - sum(ln == LOST_LINE for ln in lines[:n])
    if lost:
        warn(f"{path} is damaged ({lost} of the {n} lines before the checkpoint are unreadable or missing): "
             "they are marked lost and the run goes on")
    if kept != lines:
        atomic_write_text(path, "".join(kept))
