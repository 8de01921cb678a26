"""CELLxGENE Census source: sample cells as the seed study did, choose HVGs Census-side,
fetch only the kept genes' raw counts in chunks.

``load_census(cfg)`` returns a ``CensusSource`` (the cell-source protocol of
``cellscale.data.build``), so the build's QC, subsampling to D, splits, normalisation,
writer and baseline are the same code as for every other source:

1. open the Census: ``cellxgene_census.open_soma(census_version=...)`` (default the pinned
   LTS release the study used, ``CensusConfig.version``'s default) or ``open_soma(uri=...)``
   for a local/mirrored copy;
2. read obs ``soma_joinid, tissue_general, raw_sum`` of the cells matching
   ``obs_filter and tissue_general in tissues``; sample at most ``per_tissue_cap`` cells per
   tissue (seeded); these are the candidate rows (ascending soma_joinid);
3. the build subsamples D of them and splits them with ``make_splits``; the library size is
   the Census obs column ``raw_sum`` (total raw counts over ALL genes);
4. HVGs: ``cellxgene_census.experimental.pp.highly_variable_genes`` (seurat_v3, optional
   batch key) on an axis query restricted to the training cells' soma_joinids;
5. only the V chosen genes are read from ``X["raw"]``, in chunks of cells.

The manifest's ``source`` records release, uri, organism, filters, tissues, cap, seed and
the sha256 of the kept soma_joinids (int64 little-endian, in dataset row order).
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import cellxgene_census  # noqa: F401 - a missing extra is reported by build.load_source
import numpy as np
import pandas as pd
import tiledbsoma as soma

from cellscale.config import CENSUS_ORGANISMS, CensusConfig, DataConfig, field_default
from cellscale.data.mask import seed_sequence
from cellscale.errors import DataError

__all__ = ["load_census", "CensusSource", "KNOWN_ORGANISMS", "DEFAULT_CENSUS_VERSION", "joinid_checksum"]

DEFAULT_CENSUS_VERSION = field_default(CensusConfig, "version")  # the pinned LTS release, the seed study's
KNOWN_ORGANISMS = CENSUS_ORGANISMS
MEASUREMENT = "RNA"
X_LAYER = "raw"
FETCH_CELLS = 8192  # cells per read of the kept genes
# metadata kept in obs.parquet (those the Census copy has)
OBS_COLUMNS = (
    "soma_joinid", "dataset_id", "donor_id", "assay", "cell_type", "tissue", "tissue_general",
    "disease", "sex", "development_stage", "suspension_type", "is_primary_data", "raw_sum", "nnz",
)


def joinid_checksum(joinids: np.ndarray) -> str:
    """sha256 of soma_joinids as int64 little-endian, in the given order."""
    return hashlib.sha256(np.ascontiguousarray(joinids, dtype="<i8").tobytes()).hexdigest()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _open(uri: str | None, version: str):
    try:
        if uri:
            return cellxgene_census.open_soma(uri=uri)
        return cellxgene_census.open_soma(census_version=version)
    except Exception as err:  # noqa: BLE001 - network, S3 and TileDB errors come in many kinds
        if uri:
            raise DataError(
                f"cannot open the Census copy at --census-uri {uri} ({_short(err)}): check the path or URI"
            ) from None
        if isinstance(err, ValueError) and "Unable to locate Census version" in str(err):
            raise DataError(
                f"unknown Census release '{version}': use a published release such as {DEFAULT_CENSUS_VERSION} "
                "(the pinned long-term-support release) with --census-version"
            ) from None
        raise DataError(
            f"the CELLxGENE Census (release {version}) is unreachable ({_short(err)}): check the network, "
            "or open a local or mirrored copy with --census-uri PATH"
        ) from None


def _value_filter(obs_filter: str, tissues: list[str]) -> str:
    parts = [f"({obs_filter})"] if obs_filter and obs_filter.strip() else []
    if tissues:
        parts.append("tissue_general in [" + ", ".join(repr(str(t)) for t in tissues) + "]")
    return " and ".join(parts)


class CensusSource:
    """Cells of one Census experiment sampled by tissue; see the module docstring."""

    normalized = False

    def __init__(self, cfg: DataConfig) -> None:
        c = cfg.census
        if c.organism not in KNOWN_ORGANISMS:
            raise DataError(f"unknown Census organism '{c.organism}': use one of {', '.join(KNOWN_ORGANISMS)}")
        if cfg.hvg_flavor not in ("seurat_v3", "all"):
            raise DataError(
                f"the Census source chooses genes Census-side with seurat_v3: hvg_flavor '{cfg.hvg_flavor}' "
                "is not available for it (use seurat_v3, or all)"
            )
        self.cfg = cfg
        self.version = c.version
        self.census = _open(c.uri, c.version)
        try:
            self._init(cfg)
        except BaseException:
            self.close()
            raise

    def _init(self, cfg: DataConfig) -> None:
        c = cfg.census
        where = f"--census-uri {c.uri}" if c.uri else f"Census release {c.version}"
        self._open_experiment(c, where)
        self.value_filter = _value_filter(c.obs_filter, list(c.tissues))
        # one read per tissue (only soma_joinid and raw_sum come back): memory stays at the
        # candidates' size even when the filter matches tens of millions of cells
        self.available, self.kept = {}, {}
        self.tissues = list(dict.fromkeys(c.tissues))
        parts = [self._tissue_cells(cfg, t, code) for code, t in enumerate(self.tissues)]
        if sum(self.available.values()) == 0:
            raise DataError(
                f"the obs filter \"{self.value_filter}\" matches no cells in {where} ({c.organism}): "
                "check --obs-filter and the tissue list"
            )
        self._merge_tissues(parts, where)
        usable = int((self.raw_sum > 0).sum())
        if usable < cfg.cells:
            cap = f"a per-tissue cap of {c.per_tissue_cap}" if c.per_tissue_cap else "no per-tissue cap"
            raise DataError(
                f"the Census filter gives only {usable} cells ({len(self.tissues)} tissues, {cap}) but --cells is "
                f"{cfg.cells}: lower --cells, raise --per-tissue-cap or add tissues"
            )
        self._read_var()
        self.n_obs, self.n_vars = int(self.joinids.size), int(self.var_joinids.size)
        self.X = self.exp.ms[MEASUREMENT].X[X_LAYER]

    def _open_experiment(self, c, where: str) -> None:
        try:
            organisms = list(self.census["census_data"].keys())
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{where} is not a Census (no census_data collection: {_short(err)}): check --census-uri") from None
        if c.organism not in organisms:
            raise DataError(f"{where} has no organism '{c.organism}': use one of {', '.join(sorted(organisms))}")
        self.exp = self.census["census_data"][c.organism]
        self.obs_schema = set(self.exp.obs.schema.names)
        missing = {"tissue_general", "raw_sum"} - self.obs_schema
        if missing:
            raise DataError(f"{where}: obs has no column(s) {', '.join(sorted(missing))}: use a Census release from 2023 or later")

    def _tissue_cells(self, cfg: DataConfig, tissue: str, code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(joinids, raw_sum, tissue code) of one tissue's cells, sampled to the per-tissue cap."""
        c = cfg.census
        try:
            tbl = self.exp.obs.read(
                value_filter=_value_filter(c.obs_filter, [tissue]), column_names=["soma_joinid", "raw_sum"]
            ).concat()
        except (ValueError, TypeError, soma.SOMAError) as err:
            raise DataError(f"invalid --obs-filter '{c.obs_filter}' ({_short(err)}): use SOMA value-filter syntax, "
                            "e.g. \"is_primary_data == True and assay == '10x 3\\' v3'\"") from None
        jids = tbl["soma_joinid"].to_numpy().astype(np.int64)
        raw = tbl["raw_sum"].to_numpy().astype(np.float64)
        self.available[tissue] = int(jids.size)
        if c.per_tissue_cap is not None and jids.size > c.per_tissue_cap:
            rng = np.random.default_rng(seed_sequence(cfg.seed, "census-tissue", tissue))
            order = np.argsort(jids, kind="stable")  # the sample must not depend on read order
            pick = order[np.sort(rng.choice(jids.size, size=c.per_tissue_cap, replace=False))]
            jids, raw = jids[pick], raw[pick]
        self.kept[tissue] = int(jids.size)
        return jids, raw, np.full(jids.size, code, dtype=np.int16)

    def _merge_tissues(self, parts: list, where: str) -> None:
        joinids = np.concatenate([p[0] for p in parts])
        order = np.argsort(joinids, kind="stable")
        self.joinids = joinids[order]
        if np.any(np.diff(self.joinids) == 0):
            raise DataError(f"{where}: a cell is listed under two tissues: the Census copy is inconsistent")
        self.raw_sum = np.concatenate([p[1] for p in parts])[order]
        self.tissue_code = np.concatenate([p[2] for p in parts])[order]

    def _read_var(self) -> None:
        var = self.exp.ms[MEASUREMENT].var.read(column_names=["soma_joinid", "feature_id", "feature_name"]).concat().to_pandas()
        var = var.sort_values("soma_joinid").reset_index(drop=True)
        self.var_joinids = var["soma_joinid"].to_numpy().astype(np.int64)
        self.feature_id = var["feature_id"].astype(str).to_numpy()
        self.feature_name = var["feature_name"].astype(str).to_numpy()
        ids = pd.Index(self.feature_id)
        self.var_names = list(self.feature_id if not ids.has_duplicates else [f"{a}" for a in self.var_joinids])

    # ---------------------------------------------------------------- source protocol
    def scan(self) -> tuple[np.ndarray, np.ndarray, float | None]:
        """Library size = obs ``raw_sum`` (raw counts over all genes); no max (Census counts fit int32)."""
        return self.raw_sum.copy(), self.raw_sum > 0, None

    def obs(self, rows: np.ndarray) -> pd.DataFrame:
        extra = [k for k in (self.cfg.split_by, self.cfg.hvg_batch_key, self.cfg.census.hvg_batch_key) if k]
        cols = [k for k in dict.fromkeys([*OBS_COLUMNS, *extra]) if k in self.obs_schema]
        jids = self.joinids[np.asarray(rows)]
        df = self.exp.obs.read(coords=(jids,), column_names=cols).concat().to_pandas()
        df = df.set_index("soma_joinid", drop=False).loc[jids]
        for col in df.columns:
            if isinstance(df[col].dtype, pd.CategoricalDtype):
                df[col] = df[col].astype(str)
        df.index = pd.Index(jids.astype(str), name="cell_id")
        return df

    def select_genes(self, rows, *, n_top_genes, flavor, batch_key, target_sum, lib) -> np.ndarray:
        V = int(n_top_genes)
        if V == self.n_vars:
            return np.arange(self.n_vars, dtype=np.int64)
        if flavor == "all":
            raise DataError(
                f"hvg_flavor 'all' keeps every gene, but --genes is {V} and the Census has {self.n_vars}: use seurat_v3"
            )
        from cellxgene_census.experimental.pp import highly_variable_genes

        if batch_key is not None and batch_key not in self.obs_schema:
            raise DataError(f"hvg batch key '{batch_key}' is not a Census obs column: pick one of {sorted(self.obs_schema)[:12]}")
        train = np.sort(self.joinids[np.asarray(rows)])
        query = self.exp.axis_query(MEASUREMENT, obs_query=soma.AxisQuery(coords=(train,)))
        try:
            hvg = highly_variable_genes(query, n_top_genes=V, layer=X_LAYER, flavor="seurat_v3", batch_key=batch_key)
        except ImportError as err:
            raise DataError(f"seurat_v3 HVG selection needs scikit-misc ({err}): pip install scikit-misc") from None
        except ValueError as err:
            raise DataError(f"Census seurat_v3 HVG selection failed ({_short(err)}): use more cells or no batch key") from None
        finally:
            query.close()
        chosen = hvg.index[np.asarray(hvg["highly_variable"], dtype=bool)].to_numpy().astype(np.int64)
        idx = np.searchsorted(self.var_joinids, chosen)
        if chosen.size != V or not np.array_equal(self.var_joinids[idx], chosen):
            raise DataError(f"Census seurat_v3 selected {chosen.size} genes instead of {V}: lower --genes")
        return np.sort(idx).astype(np.int64)

    def blocks(self, rows: np.ndarray, genes: np.ndarray) -> Iterator[np.ndarray]:
        """Raw counts of the kept cells x kept genes, read in chunks of ``FETCH_CELLS`` cells."""
        from cellscale.data.sources.h5ad import check_values

        gj = self.var_joinids[np.asarray(genes)]  # ascending
        jids_all = self.joinids[np.asarray(rows)]  # ascending
        for start in range(0, jids_all.size, FETCH_CELLS):
            jids = jids_all[start : start + FETCH_CELLS]
            block = np.zeros((jids.size, gj.size), dtype=np.float32)
            for tbl in self.X.read(coords=(jids, gj)).tables():
                r = np.searchsorted(jids, tbl["soma_dim_0"].to_numpy())
                g = np.searchsorted(gj, tbl["soma_dim_1"].to_numpy())
                block[r, g] = tbl["soma_data"].to_numpy()
            check_values(block, normalized=False, where=f"Census X['{X_LAYER}']")
            yield block

    def describe(self, rows: np.ndarray, genes: np.ndarray) -> dict[str, Any]:
        c = self.cfg.census
        jids = self.joinids[np.asarray(rows)]
        kept_codes = np.bincount(self.tissue_code[np.asarray(rows)], minlength=len(self.tissues))
        info: dict[str, Any] = {
            "kind": "census",
            "census_version": None if c.uri else c.version,
            "uri": c.uri,
            "organism": c.organism,
            "obs_filter": c.obs_filter,
            "value_filter": self.value_filter,
            "tissues": list(c.tissues),
            "per_tissue_cap": c.per_tissue_cap,
            "seed": int(self.cfg.seed),
            "measurement": MEASUREMENT,
            "X_layer": X_LAYER,
            "n_cells_per_tissue_available": self.available,
            "n_cells_per_tissue_sampled": self.kept,
            "n_cells_per_tissue_kept": {t: int(kept_codes[i]) for i, t in enumerate(self.tissues)},
            "n_census_genes": self.n_vars,
            "soma_joinids_sha256": joinid_checksum(jids),
            "gene_names": [str(self.feature_name[g]) for g in genes],
            "library_size": "Census obs raw_sum: raw counts over all genes",
            "hvg": "cellxgene_census.experimental.pp.highly_variable_genes (seurat_v3) on the training cells",
        }
        info.update(self._release_info())
        return info

    def _release_info(self) -> dict[str, Any]:
        """Build date and schema version from census_info/summary, when the copy has them."""
        try:
            df = self.census["census_info"]["summary"].read().concat().to_pandas()
            kv = dict(zip(df["label"].astype(str), df["value"].astype(str)))
        except Exception:  # noqa: BLE001 - a mirror may lack census_info
            return {}
        return {k: kv[k] for k in ("census_build_date", "census_schema_version", "dataset_schema_version") if k in kv}

    def close(self) -> None:
        census = getattr(self, "census", None)
        if census is not None:
            try:
                census.close()
            except Exception:  # noqa: BLE001
                pass
            self.census = None


def load_census(cfg: DataConfig) -> CensusSource:
    """Open the Census named by ``cfg.census`` and sample its candidate cells."""
    return CensusSource(cfg)
