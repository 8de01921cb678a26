"""A run directory: who it belongs to (the run's identity hash), claiming it, and trimming its
metrics log back to a checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from cellscale import __version__
from cellscale.config import ModelConfig, TrainConfig, identity_dump
from cellscale.data.store import Dataset
from cellscale.distributed import DistContext
from cellscale.errors import RunError
from cellscale.io import atomic_write_json, atomic_write_text, read_json
from cellscale.schema import FINISHED


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


def _stored_hash(config_path: Path) -> str | None:
    try:
        return read_json(config_path).get("hash")
    except ValueError:
        return None


def _clear_unless_same(out: Path, ident_hash: str) -> None:
    if out.exists() or out.is_symlink():
        config_path = out / "config.json"
        if config_path.is_file() and _stored_hash(config_path) == ident_hash:
            return
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        else:
            out.unlink()


def claim_run_dir(
    out: Path, identity: dict[str, Any], ident_hash: str, *, overwrite: bool = False
) -> dict[str, Any] | None:
    """Check ``out`` for this run: the finished result (returned), a resumable or new run
    (None, config.json written), or a RunError for a directory that holds something else
    (replaced instead when ``overwrite``)."""
    result_path = out / "result.json"
    config_path = out / "config.json"
    if overwrite:
        _clear_unless_same(out, ident_hash)
    if config_path.is_file():
        if _stored_hash(config_path) != ident_hash:
            raise RunError(
                f"{out} holds a run with other settings; choose another --out, or --overwrite"
            )
        if result_path.is_file():
            prev = read_json(result_path)
            if prev.get("status") in FINISHED:
                return prev
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out} is not empty and holds no cellscale run; choose another --out, or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, {"hash": ident_hash, **identity, "cellscale_version": __version__})
    return None


def claim_shared(out: Path, identity: dict[str, Any], ident_hash: str, *, overwrite: bool,
                 dist: DistContext) -> dict[str, Any] | None:
    """:func:`claim_run_dir` under DDP: rank 0 alone inspects and claims the run dir, and every
    rank follows its verdict (the finished result, go on, or the same RunError)."""
    if not dist.active:
        return claim_run_dir(out, identity, ident_hash, overwrite=overwrite)
    verdict: tuple[str, Any] = ("go", None)
    if dist.is_main:
        try:
            prev = claim_run_dir(out, identity, ident_hash, overwrite=overwrite)
            verdict = ("done", prev) if prev is not None else ("go", None)
        except RunError as err:
            verdict = ("error", str(err))
    kind, payload = dist.broadcast_object(verdict)
    if kind == "error":
        raise RunError(payload)
    return payload


def truncate_lines(path: Path, n: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) != n:
        atomic_write_text(path, "".join(lines[:n]))
