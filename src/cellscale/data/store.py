"""The dataset directory: atomic writing, checksummed reading, memory-mapped arrays.

Layout (DESIGN.md)::

    manifest.json      source, V, D, seed, preprocessing, genes, split sizes, eval mask,
                       baselines, checksums (sha256 of every file below), version, created
    values.npy         cells x V, float32 or float16: log1p(counts / library_size * target_sum)
    counts.npy         cells x V raw counts (int32, or float32 past int32); absent for
                       normalised input
    library_size.npy   cells, float64: total counts over ALL genes (before the cut to V)
    splits.npz         train (seeded permutation order: train[:N] is the nested subset), val,
                       test (sorted); int64 row indices
    obs.parquet        per-cell metadata, row i = array row i

A directory is written into ``.<name>.building-<pid>-<token>`` next to the target, every file
fsynced, the manifest written last, then renamed into place: a killed build never leaves a
directory that ``Dataset.open`` would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from cellscale.data.manifest import FORMAT, FORMAT_VERSION, Manifest
from cellscale.data.mask import draw_mask, seed_sequence
from cellscale.errors import DataError
from cellscale.runtime.io import to_json

__all__ = ["Dataset", "DatasetWriter", "FORMAT", "FORMAT_VERSION", "Manifest", "is_dataset_dir", "sha256_file", "target_state"]

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 24


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def is_dataset_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a cellscale dataset manifest (files not verified)."""
    return _read_manifest(Path(path)) is not None


def target_state(path: str | os.PathLike) -> Literal["absent", "empty", "dataset", "other"]:
    path = Path(path)
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "other"
    if not any(path.iterdir()):
        return "empty"
    return "dataset" if is_dataset_dir(path) else "other"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(target: Path) -> None:
    """Remove temp dirs of earlier killed builds (or replacements) of the same target."""
    leftovers = [*target.parent.glob(f".{target.name}.building-*"), *target.parent.glob(f".{target.name}.old-*")]
    for tmp in leftovers:
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if not _pid_alive(pid) or pid == os.getpid():
            shutil.rmtree(tmp, ignore_errors=True)


class DatasetWriter:
    """Builds a dataset directory in a temp dir next to ``out``; ``commit`` renames it in.

    Use as a context manager: leaving the block by an exception removes the temp dir.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        check_target(self.out, overwrite=overwrite)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale(self.out)
        self.tmp = self.out.parent / f".{self.out.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        self._memmaps: dict[str, np.memmap] = {}
        self._done = False

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        self._memmaps.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
        """A writable .npy memmap ``name`` in the temp dir (fill it, then commit)."""
        mm = np.lib.format.open_memmap(self.tmp / name, mode="w+", dtype=dtype, shape=shape)
        self._memmaps[name] = mm
        return mm

    def save(self, name: str, array: np.ndarray) -> None:
        with open(self.tmp / name, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)

    def copy_file(self, name: str, src: str | os.PathLike) -> None:
        """Copy ``src`` byte for byte as ``name`` (a derived dataset keeps its parent's file)."""
        shutil.copyfile(src, self.tmp / name)

    def save_splits(self, splits: dict[str, np.ndarray]) -> None:
        with open(self.tmp / "splits.npz", "wb") as f:
            np.savez(f, **{k: np.asarray(v, dtype=np.int64) for k, v in splits.items()})

    def save_obs(self, obs: pd.DataFrame) -> None:
        df = obs.copy()
        df.insert(0, "cell_id", df.index.astype(str))
        df = df.reset_index(drop=True)
        for col in df.columns:
            if df[col].dtype == object:
                df[col] = df[col].astype(str)
        df.to_parquet(self.tmp / "obs.parquet", index=False)

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Checksum every file, write the manifest last, fsync, and rename into ``out``."""
        for mm in self._memmaps.values():
            mm.flush()
        self._memmaps.clear()
        files = sorted(p.name for p in self.tmp.iterdir() if p.is_file())
        checksums, sizes = {}, {}
        for name in files:
            _fsync_path(self.tmp / name)
            checksums[name] = sha256_file(self.tmp / name)
            sizes[name] = (self.tmp / name).stat().st_size
        from cellscale import __version__

        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **manifest,
            "files": sizes,
            "checksums": checksums,
            "cellscale_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        text = to_json(manifest, indent=1)
        with open(self.tmp / MANIFEST, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(self.tmp)
        state = target_state(self.out)
        old = None
        if state in ("dataset", "other"):
            check_target(self.out, overwrite=self.overwrite)
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(self.out, old)
        elif state == "empty":
            self.out.rmdir()
        os.replace(self.tmp, self.out)
        _fsync_path(self.out.parent)
        self._done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        return self.out


def check_target(out: Path, *, overwrite: bool) -> None:
    """Refuse an output path that holds something (a file, a non-empty dir) unless overwrite."""
    state = target_state(out)
    if overwrite or state in ("absent", "empty"):
        return
    if state == "dataset":
        raise DataError(f"{out} already holds another cellscale dataset: pass --overwrite to replace it or choose another --out")
    raise DataError(f"{out} exists and is not a cellscale dataset: pass --overwrite to replace it or choose another --out")


class Dataset:
    """A dataset directory opened for reading; arrays are memory-mapped and opened lazily."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest  # the raw dict; ``meta`` is the same manifest, typed and validated
        self.meta = Manifest.parse(manifest, origin=path / MANIFEST)
        self._eval_masks: dict[str, np.ndarray] = {}
        self._eval_subsets: dict[tuple[str, int], np.ndarray] = {}

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool | Literal["full", "quick", "none"] = True) -> "Dataset":
        """Open a dataset dir. ``verify``: True/"full" checks file sizes, array shapes and
        sha256 checksums; "quick" checks sizes and shapes only; False/"none" checks nothing
        beyond the manifest."""
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"dataset directory not found: {path}: build it with `cellscale data build`")
        manifest = _read_manifest(path)
        if manifest is None:
            what = "has no readable manifest.json" if not (path / MANIFEST).exists() else "has a damaged or foreign manifest.json"
            raise DataError(f"{path} is not a cellscale dataset ({what}): rebuild it with `cellscale data build`")
        ds = cls(path, manifest)
        mode = {True: "full", False: "none"}.get(verify, verify)
        if mode not in ("full", "quick", "none"):
            raise ValueError(f"verify must be True, False, 'full', 'quick' or 'none', got {verify!r}")
        if mode != "none":
            ds.verify(full=mode == "full")
        return ds

    def verify(self, *, full: bool = True) -> None:
        """Check every file listed in the manifest: present, same size, right array shape,
        and (``full``) same sha256. Raises DataError naming the first bad file."""
        fix = "rebuild the dataset with `cellscale data build --overwrite`"
        for name, size in self.manifest.get("files", {}).items():
            p = self.path / name
            if not p.is_file():
                raise DataError(f"dataset {self.path}: {name} is missing: {fix}")
            actual = p.stat().st_size
            if actual != size:
                what = "truncated" if actual < size else "changed"
                raise DataError(f"dataset {self.path}: {name} is {what} ({actual} bytes, expected {size}): {fix}")
        for name, shape in self.manifest.get("shapes", {}).items():
            try:
                arr = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise DataError(f"dataset {self.path}: {name} is unreadable ({err}): {fix}") from None
            if list(arr.shape) != list(shape):
                raise DataError(f"dataset {self.path}: {name} has shape {arr.shape}, expected {tuple(shape)}: {fix}")
        if full:
            for name, digest in self.manifest.get("checksums", {}).items():
                if sha256_file(self.path / name) != digest:
                    raise DataError(f"dataset {self.path}: {name} does not match its checksum (changed or corrupt): {fix}")

    # ---------------------------------------------------------------- metadata
    @property
    def genes(self) -> list[str]:
        return list(self.manifest["genes"])

    @property
    def n_genes(self) -> int:
        return int(self.manifest["V"])

    @property
    def n_cells(self) -> int:
        return int(self.manifest["D"])

    @property
    def mask_prob(self) -> float:
        return float(self.manifest["mask_prob"])

    @property
    def eval_mask_seed(self) -> int:
        return int(self.manifest["eval_mask_seed"])

    @property
    def baselines(self) -> dict[str, dict[str, float]]:
        return self.manifest.get("baselines", {})

    @property
    def target_sum(self) -> float:
        """The normalisation's counts per cell (values = log1p(counts / library_size * target_sum))."""
        return float((self.manifest.get("preprocessing") or {}).get("target_sum", 1e4))

    @property
    def normalized_input(self) -> bool:
        """Were the values stored as given (normalised input), rather than made from raw counts?"""
        pre = self.manifest.get("preprocessing") or {}
        return bool(pre.get("normalized_input", False)) or "counts.npy" not in self.manifest.get("files", {})

    def registry(self) -> dict[str, Any]:
        """What a model trained on these values needs to embed new cells, with nothing else at hand
        (a run keeps it as ``RUN_DIR/registry.json``; scvi-tools calls this the model's registry):
        the genes in the model's order and how values were made from a cell's counts."""
        pre = self.manifest.get("preprocessing") or {}
        return {"genes": self.genes, "n_genes": self.n_genes, "target_sum": self.target_sum,
                "normalized_input": self.normalized_input,
                "transform": "as given" if self.normalized_input else "log1p(counts / library size x target_sum)",
                "library_size": pre.get("library_size", "total over all source genes, before gene selection"),
                "dataset_checksum": (self.manifest.get("checksums") or {}).get("values.npy")}

    # ---------------------------------------------------------------- arrays
    def _load(self, name: str) -> np.ndarray:
        try:
            return np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"dataset {self.path}: cannot read {name} ({err}): rebuild the dataset") from None

    @cached_property
    def values(self) -> np.ndarray:
        """Memmap (cells x V) of normalised log1p values, float32 or float16."""
        return self._load("values.npy")

    @cached_property
    def counts(self) -> np.ndarray | None:
        """Memmap (cells x V) of raw counts, or None for a dataset built from normalised input."""
        if "counts.npy" not in self.manifest.get("files", {}):
            return None
        return self._load("counts.npy")

    @cached_property
    def library_size(self) -> np.ndarray:
        return np.asarray(self._load("library_size.npy"))

    @cached_property
    def library_scale(self) -> np.ndarray:
        """library_size / target_sum (float64 [cells]): a count model's mean is rate x scale."""
        return np.asarray(self.library_size, dtype=np.float64) / self.target_sum

    @cached_property
    def splits(self) -> dict[str, np.ndarray]:
        try:
            with np.load(self.path / "splits.npz", allow_pickle=False) as z:
                return {k: np.asarray(z[k], dtype=np.int64) for k in z.files}
        except (OSError, ValueError) as err:
            raise DataError(f"dataset {self.path}: cannot read splits.npz ({err}): rebuild the dataset") from None

    @cached_property
    def obs(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "obs.parquet")

    def train_indices(self, n: int | None = None) -> np.ndarray:
        """The first ``n`` training cells of the fixed permutation (all when None): nested."""
        train = self.splits["train"]
        if n is None:
            return train
        n = int(n)
        if n < 1 or n > train.size:
            raise DataError(f"train_cells={n} but the train split has {train.size} cells: use 1..{train.size}")
        return train[:n]

    def eval_positions(self, split: str, max_cells: int | None = None) -> np.ndarray:
        """Positions (into the split, ascending) of the cells a capped evaluation scores: all of them
        when ``max_cells`` is None or at least the split's size; else a fixed, seeded subset of
        ``max_cells`` drawn across the whole split, in proportion to each stratum of
        ``EVAL_STRATA`` (the first such column the cell metadata has: a tissue, a dataset), so that
        it represents the split whatever the order of the source's rows. The same subset for every
        evaluation and every run on this dataset."""
        n = int(self.splits[split].size)
        if max_cells is None or int(max_cells) >= n:
            return np.arange(n, dtype=np.int64)
        key = (split, int(max_cells))
        if key not in self._eval_subsets:
            rng = np.random.default_rng(seed_sequence(self.eval_mask_seed, f"{split}-eval-subset"))
            self._eval_subsets[key] = stratified_subset(self._strata(split), int(max_cells), rng)
        return self._eval_subsets[key]

    def _strata(self, split: str) -> np.ndarray:
        """A stratum label per cell of ``split`` (all one stratum without a stratifying column)."""
        try:
            obs = self.obs
        except (OSError, ValueError):
            obs = None
        col = next((c for c in EVAL_STRATA if obs is not None and c in obs.columns), None)
        n = int(self.splits[split].size)
        if col is None or len(obs) != self.n_cells:
            return np.zeros(n, dtype=np.int64)
        return pd.factorize(obs[col].astype(str).to_numpy()[self.splits[split]])[0]

    def eval_mask(self, split: str) -> np.ndarray:
        """The fixed evaluation mask (n_split_cells x V bool) of ``split``, in split order."""
        if split not in self.splits:
            raise DataError(f"unknown split '{split}': use one of {sorted(self.splits)}")
        if split not in self._eval_masks:
            self._eval_masks[split] = eval_mask(
                self.splits[split].size, self.n_genes, seed=self.eval_mask_seed, split=split, mask_prob=self.mask_prob
            )
        return self._eval_masks[split]

    def __repr__(self) -> str:
        sizes = self.manifest.get("split_sizes", {})
        return f"Dataset({str(self.path)!r}, D={self.n_cells}, V={self.n_genes}, splits={sizes})"


# the cell-metadata columns a capped evaluation's subset is stratified by, the first one present
EVAL_STRATA = ("tissue_general", "tissue", "dataset_id", "batch")


def stratified_subset(strata: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``strata``'s positions, sorted: each stratum's share by largest remainders (at least
    one of a stratum when k allows), its cells drawn at random."""
    labels, counts = np.unique(strata, return_counts=True)
    quota = counts * (k / counts.sum())
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: k - int(take.sum())]:
        take[i] += 1
    picked = [rng.choice(np.flatnonzero(strata == lab), size=t, replace=False) for lab, t in zip(labels, take) if t]
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.empty(0, dtype=np.int64)


def eval_mask(n_cells: int, n_genes: int, *, seed: int, split: str, mask_prob: float) -> np.ndarray:
    """The deterministic evaluation mask: Bernoulli(mask_prob), >= 1 masked gene per cell,
    from ``default_rng(SeedSequence((seed, split)))``."""
    rng = np.random.default_rng(seed_sequence(seed, split))
    return draw_mask(rng, n_cells, n_genes, mask_prob)
