"""What a dataset directory holds, as a dict and as the table ``cellscale data info`` prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cellscale.data.store import Dataset

__all__ = ["dataset_info", "info_table"]

# the baselines.json entries worth showing: one number per split each
_CACHED_BASELINES = ("gene_mean", "bayes_linear", "knn", "bayes_floor")
# source keys shown after the source kind, when set
_SOURCE_KEYS = ("mode", "path", "layer", "census_version", "uri", "organism", "obs_filter")


def dataset_info(path: str | Path) -> dict[str, Any]:
    """What ``cellscale data info`` shows, as a dict (the dataset is verified in full first)."""
    ds = Dataset.open(path, verify="full")  # sizes, shapes and sha256 of every file
    m = ds.manifest
    info: dict[str, Any] = {
        "path": str(ds.path.resolve()),
        "source": m.get("source") or {},
        "V": ds.n_genes, "D": ds.n_cells,
        "split_sizes": m.get("split_sizes") or {},
        "split": m.get("split") or {},
        "dtype": m.get("dtype"), "counts_dtype": m.get("counts_dtype"),
        "preprocessing": m.get("preprocessing") or {},
        "mask_prob": m.get("mask_prob"), "eval_mask_seed": m.get("eval_mask_seed"),
        "depth_fraction": float(m.get("depth_fraction", 1.0)), "thinning": m.get("thinning"),
        "baselines": {"gene_mean": (m.get("baselines") or {}).get("gene_mean") or {}},
        "checksums_verified": sorted(m.get("checksums") or {}),
        "config_hash": m.get("config_hash"),
        "cellscale_version": m.get("cellscale_version"), "created": m.get("created"),
        "genes_first": ds.genes[:10],
    }
    cache = ds.path / "baselines.json"
    if cache.is_file():
        info["cached_baselines"] = _cached_baselines(cache)
    return info


def _cached_baselines(cache: Path) -> dict[str, dict[str, Any]]:
    """{cache key: {baseline: {split: MSE}}} of a ``baselines.json``; an unreadable one is empty
    (it is a cache: the next sweep rewrites it)."""
    try:
        entries = json.loads(cache.read_text()).get("entries") or {}
    except (OSError, ValueError, AttributeError):
        entries = {}
    return {
        key: {name: e[name] for name in _CACHED_BASELINES if name in e}
        for key, e in entries.items() if isinstance(e, dict)
    }


# ----------------------------------------------------------------------------- the table


def fmt(value: Any) -> str:
    """A table cell: floats to 6 significant digits, lists comma-joined, None as '-'."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if value is None:
        return "-"
    return str(value)


def info_table(info: dict[str, Any]) -> list[str]:
    """The lines of ``cellscale data info``: one ``key  value`` row each, keys aligned."""
    rows = [*_source_rows(info), *_shape_rows(info), *_depth_rows(info), *_preprocessing_rows(info),
            *_baseline_rows(info), *_provenance_rows(info)]
    width = max(len(k) for k, _ in rows)
    return [f"{key:<{width}}  {fmt(value)}".rstrip() for key, value in rows]


def _source_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    src = info["source"]
    text = src.get("kind", "?")
    for key in _SOURCE_KEYS:
        if src.get(key) not in (None, ""):
            text += f"  {key}={src[key]}"
    rows: list[tuple[str, Any]] = [("path", info["path"]), ("source", text)]
    per_tissue = src.get("n_cells_per_tissue_kept")
    if isinstance(per_tissue, dict):
        rows.append(("cells per tissue", "  ".join(f"{t} {n}" for t, n in per_tissue.items())))
    return rows


def _shape_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    splits = "  ".join(f"{k} {v}" for k, v in info["split_sizes"].items())
    split_by = info["split"].get("split_by")
    if split_by:
        splits += f"  (held out by {split_by})"
    dtype = f"{info['dtype']} values" + (f", {info['counts_dtype']} counts" if info["counts_dtype"] else "")
    return [("genes (V)", info["V"]), ("cells (D)", info["D"]), ("splits", splits), ("dtype", dtype)]


def _depth_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    thin = info["thinning"]
    if not isinstance(thin, dict) or not thin:
        return []
    return [("depth", f"{info['depth_fraction']:g} of the reads (binomially thinned by "
                      f"{thin.get('fraction', 0):g}, seed {thin.get('seed')}, from {thin.get('parent_path')})")]


def _preprocessing_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    return [("preprocessing", ""), *((f"  {k}", fmt(v)) for k, v in info["preprocessing"].items())]


def _baseline_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    gene_mean = info["baselines"]["gene_mean"]
    if gene_mean:
        rows.append(("gene-mean MSE", "  ".join(f"{k} {v:.4f}" for k, v in gene_mean.items())))
    for key, entry in (info.get("cached_baselines") or {}).items():
        parts = [f"{name} " + "/".join(f"{v:.4f}" for v in splits.values())
                 for name, splits in entry.items() if isinstance(splits, dict)]
        rows.append((f"baselines {key[:8]}", "  ".join(parts) + "  (val/test, baselines.json)"))
    return rows


def _provenance_rows(info: dict[str, Any]) -> list[tuple[str, Any]]:
    genes = ", ".join(info["genes_first"]) + (", ..." if info["V"] > len(info["genes_first"]) else "")
    return [
        ("mask", f"p={info['mask_prob']}, eval seed {info['eval_mask_seed']}"),
        ("checksums", f"verified ok ({len(info['checksums_verified'])} files, sha256)"),
        ("first genes", genes),
        ("built", f"{info['created']} by cellscale {info['cellscale_version']} (config {info['config_hash']})"),
    ]
