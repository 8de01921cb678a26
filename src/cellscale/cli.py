"""cellscale command line: each subcommand parses, calls one function, prints.

Bad input ends with one line ``error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from cellscale import __version__
from cellscale.errors import CellscaleError
from cellscale.runtime.cpus import prepare_threads
from cellscale.runtime.preempt import Preempted, ignore_stop_signals

EPILOG = """examples:
  cellscale run                                   # the demo study, offline, a few minutes on a laptop
  cellscale run --preset smoke --out smoke-out    # a tiny end-to-end check (< 1 minute)
  cellscale data build --source h5ad --input my.h5ad --genes 512 --cells 20000 --out ds
  cellscale train --data ds --size XS --out runs/xs --cells-seen 100000
  cellscale sweep configs/demo.yaml --out sweep
  cellscale fit sweep/results.csv --law power-floor --json
  cellscale report sweep
  cellscale data info ds                          # what a dataset directory holds
  cellscale data thin ds --fraction 0.25 --out ds-f0.25   # a quarter of the sequencing depth
  cellscale --quiet run --preset smoke            # results only: no progress bars or per-run lines
"""

class RAW(argparse.RawDescriptionHelpFormatter):
    """Examples (an epilog starting with 'examples:') are printed as written; descriptions wrap."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def _examples(*lines: str) -> str:
    """An argparse epilog: 'examples:' and one indented command line each."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) + "\n"


def _quiet_parent() -> argparse.ArgumentParser:
    """``--quiet`` accepted after a subcommand too; SUPPRESS keeps a global --quiet set."""
    q = argparse.ArgumentParser(add_help=False)
    q.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress bars or per-run lines; results are still printed")
    q.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS, metavar="N",
                   help="threads per pool for torch and BLAS (default: the CPUs this process may use, "
                        "from its affinity and cgroup quota)")
    return q


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_data(sub: argparse._SubParsersAction) -> None:
    quiet = _quiet_parent()
    data = sub.add_parser(
        "data", help="build or inspect a dataset directory", parents=[quiet], formatter_class=RAW,
        description="Build a dataset directory from a source (data build), show what one holds (data info) "
                    "or thin its counts to a fraction of the sequencing depth (data thin).",
        epilog=_examples(
            "cellscale data build --source simulate --genes 512 --cells 10000 --out ds",
            "cellscale data info ds",
            "cellscale data thin ds --fraction 0.25 --out ds-f0.25",
        ),
    )
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    _add_data_info(dsub, quiet)
    _add_data_thin(dsub, quiet)
    _add_data_build(dsub, quiet)


def _add_data_info(dsub: argparse._SubParsersAction, quiet: argparse.ArgumentParser) -> None:
    info = dsub.add_parser(
        "info", help="print a table of a dataset's manifest (checksums verified)", parents=[quiet],
        formatter_class=RAW,
        description="Open a dataset directory, verify every file against its sha256 checksum and print "
                    "its manifest as a table: source, V, D, split sizes, dtype, preprocessing, the "
                    "gene-mean baseline, cached baselines and the first genes.",
        epilog=_examples("cellscale data info ds", "cellscale data info ds --json   # one JSON object"),
    )
    info.add_argument("dataset_dir", help="dataset directory from `cellscale data build`")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _add_data_thin(dsub: argparse._SubParsersAction, quiet: argparse.ArgumentParser) -> None:
    th = dsub.add_parser(
        "thin", help="binomially thin a dataset's counts to a fraction of its sequencing depth",
        parents=[quiet], formatter_class=RAW,
        description="Write a new dataset directory whose counts are the parent's thinned binomially: each "
                    "count c becomes Binomial(c, F), as if F of the reads had been sequenced. The library "
                    "size over all genes is thinned exactly (the genes outside the V kept ones as one "
                    "binomial); values are renormalised and log1p'd with the parent's target sum. Genes, "
                    "cells, splits and the evaluation mask are the parent's. Needs raw counts (not a "
                    "dataset from normalised input or the gaussian simulator). See docs/noise.md.",
        epilog=_examples(
            "cellscale data thin ds --fraction 0.25 --out ds-f0.25",
            "cellscale data thin ds --fraction 0.1 --seed 1 --out ds-f0.1-s1",
        ),
    )
    th.add_argument("dataset_dir", help="dataset directory with raw counts, from `cellscale data build`")
    th.add_argument("--fraction", type=float, required=True,
                    help="share of the reads kept, in (0, 1]; 1 copies the parent's arrays")
    th.add_argument("--seed", type=int, default=0, help="seed of the binomial draws (default 0)")
    th.add_argument("--out", required=True, help="the new dataset directory")
    th.add_argument("--overwrite", action="store_true", help="replace an existing directory at --out")


def _add_data_build(dsub: argparse._SubParsersAction, quiet: argparse.ArgumentParser) -> None:
    from cellscale.config import CENSUS_ORGANISMS, CensusConfig, DataConfig, literal_values

    b = dsub.add_parser(
        "build", help="QC -> library size over all genes -> normalise+log1p -> HVG -> splits",
        parents=[quiet], formatter_class=RAW,
        epilog=_examples(
            "cellscale data build --source simulate --genes 512 --cells 10000 --out ds",
            "cellscale data build --source h5ad --input my.h5ad --layer counts --genes 512 --cells 50000 --out ds",
            "cellscale data build --source census --genes 512 --cells 200000 --split-by dataset_id --out census-ds",
        ),
        description="Build a dataset directory (memory-mapped arrays + manifest.json) from a source. "
                    "--source census samples the CELLxGENE Census by tissue (needs pip install "
                    "'cellscale[census]'; the manifest records release, filters, tissues, cap, seed and a "
                    "checksum of the soma_joinids); .h5ad files of 256 MiB or more are read in row chunks.",
    )
    data, census = DataConfig(), CensusConfig()  # the defaults the help states
    b.add_argument("--source", choices=literal_values(DataConfig, "source"), help="required unless --config gives it")
    b.add_argument("--input", help="the .h5ad file (--source h5ad)")
    b.add_argument("--layer", help="read raw counts from this layer instead of X")
    b.add_argument("--normalized", action="store_true",
                   help="X already holds normalised log values: no count checks, no normalisation; "
                        "HVG by variance, or all genes when --genes equals their number")
    b.add_argument("--census-uri", help="open a local or mirrored Census copy (SOMA store path or URI) "
                   "instead of the released Census")
    b.add_argument("--census-version",
                   help=f"Census release (default {census.version}, a long-term-support release and the one the "
                        "seed study used)")
    b.add_argument("--organism", help=f"Census organism, one of {', '.join(CENSUS_ORGANISMS)} "
                                      f"(default {census.organism})")
    b.add_argument("--obs-filter", help=f"Census obs value filter, SOMA syntax (default: {census.obs_filter}, "
                   "so no cell is counted twice)")
    b.add_argument("--tissues", help="comma-separated Census tissue_general values to sample (default the "
                   f"study's {len(census.tissues)}: {','.join(census.tissues)})")
    b.add_argument("--per-tissue-cap", type=int,
                   help="at most this many cells per tissue (seeded sample), before subsampling to --cells")
    b.add_argument("--hvg-batch-key", help="obs column for batch-aware seurat_v3 HVG selection, e.g. dataset_id")
    b.add_argument("--split-by", help="hold out whole groups of this obs column, e.g. dataset_id")
    b.add_argument("--genes", type=int, help="V, the number of genes kept (required unless --config gives it)")
    b.add_argument("--cells", type=int, help="D, the number of cells kept (required unless --config gives it)")
    b.add_argument("--seed", type=int, help=f"default: --config's, else {data.seed}")
    b.add_argument("--dtype", choices=literal_values(DataConfig, "dtype"),
                   help=f"default: --config's, else {data.dtype}")
    b.add_argument("--config", help="a study YAML whose data section gives the other settings")
    b.add_argument("--out", required=True)
    b.add_argument("--overwrite", action="store_true", help="replace an existing directory at --out")

def _add_train(sub: argparse._SubParsersAction) -> None:
    from cellscale.config import ModelConfig, TrainConfig, field_default, literal_values

    t = sub.add_parser(
        "train", help="train one model size; rerunning the same command resumes",
        description="Train one model size on one training subset. Writes RUN_DIR/result.json, "
                    "metrics.jsonl, best.safetensors and a resumable checkpoint. Under torchrun "
                    "(WORLD_SIZE > 1) the run is data parallel (DDP): each process takes its "
                    "slice of every global batch of --batch-size cells, which must divide by the "
                    "number of processes; see docs/DISTRIBUTED.md.",
        parents=[_quiet_parent()], formatter_class=RAW,
        epilog=_examples(
            "cellscale train --data ds --size XS --out runs/xs --cells-seen 100000",
            "cellscale train --data ds --size M --out runs/m --train-cells 50000 --seed 1",
            "torchrun --nproc_per_node=4 -m cellscale.cli train --data ds --size M --out runs/m --batch-size 256",
        ),
    )
    t.add_argument("--data", required=True, help="dataset directory from `cellscale data build`")
    t.add_argument("--size", required=True, help="XXS, TINY, XS, S, M, L, XL or a custom size of --config")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--train-cells", type=int, help="use the first N cells of the fixed train permutation")
    t.add_argument("--cells-seen", type=int, help="training budget in cells drawn")
    t.add_argument("--objective", choices=literal_values(ModelConfig, "objective"),
                   help="what the head predicts, one of %(choices)s (mse: the study's; gaussian-nll: mean and "
                        "variance; nb: negative binomial on raw counts); default: the config's model.objective, "
                        f"else {field_default(ModelConfig, 'objective')}")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--config", help="study YAML: the run trains as in its sweep (train/model sections, "
                                    "custom sizes, sweep.overrides, sweep.epochs); the flags go on top")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float, help="peak learning rate (default: auto by width)")
    for name in ("schedule", "device", "precision"):  # unset: the config's train section decides
        t.add_argument(f"--{name}", choices=literal_values(TrainConfig, name),
                       help=f"one of %(choices)s; default: the config's train.{name}, "
                            f"else {field_default(TrainConfig, name)}")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--checkpoint-minutes", type=float, metavar="N",
                   help="also checkpoint every N minutes of wall time, as well as at evaluations "
                        "(a kill -9 loses at most N minutes); default off")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a --out that holds something else or a run with other settings")


def _add_ladder(sub: argparse._SubParsersAction) -> None:
    from cellscale.config import DataConfig, field_default

    lad = sub.add_parser("ladder", help="table of model sizes and parameter counts", parents=[_quiet_parent()],
                         formatter_class=RAW,
                         epilog=_examples("cellscale ladder", "cellscale ladder --genes 1024 --json"))
    lad.add_argument("--genes", type=int, default=field_default(DataConfig, "genes"), help="V (default %(default)s)")
    lad.add_argument("--json", action="store_true", help="print the rows as JSON")


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    sw = sub.add_parser(
        "sweep", help="train a grid of runs from a study YAML; resumable",
        description="Train every run of a study YAML into SWEEP_DIR/runs/<run_id> and collect "
                    "SWEEP_DIR/results.csv (rewritten atomically after each run). Rerunning the "
                    "same command skips finished runs and resumes an interrupted one. A failed "
                    "run is recorded with status 'failed' and its error; the sweep goes on.",
        parents=[_quiet_parent()], formatter_class=RAW,
        epilog=_examples(
            "cellscale sweep configs/demo.yaml --out sweep",
            "cellscale sweep my-study.yaml --out sweep --backend ray --ray-address auto",
        ),
    )
    sw.add_argument("config", help="study YAML (see configs/)")
    sw.add_argument("--out", required=True, help="sweep directory")
    sw.add_argument("--backend", choices=_backends(),
                    help="local: on this machine, --workers runs at once; ray: each run a Ray task "
                         "with sweep.num_cpus_per_run / num_gpus_per_run (default: sweep.backend)")
    _add_workers(sw)
    sw.add_argument("--ray-address", help="join this Ray cluster, e.g. ray://head:10001 or auto "
                                          "(default: start a private local Ray, removed afterwards)")
    sw.add_argument("--overwrite", action="store_true", help="replace a sweep dir that holds another study")


def _backends() -> tuple[str, ...]:
    from cellscale.config import SweepConfig, literal_values

    return literal_values(SweepConfig, "backend")


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a count of processes (1 or more) or auto")
    return n


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_workers, metavar="N|auto",
                        help="local backend: runs at once, each in its own process of sweep.num_cpus_per_run "
                             "threads; auto = usable CPUs / num_cpus_per_run; 1 = one after another in this "
                             "process (default: sweep.workers)")


def _add_fit(sub: argparse._SubParsersAction) -> None:
    from cellscale.config import FitConfig, literal_values
    from cellscale.fit.defaults import LAW_NAMES, METHOD_NAMES, default_interval

    default = FitConfig()  # a study's fit section and this command share these defaults
    f = sub.add_parser("fit", help="fit a scaling law to a results table",
                       description="Fit a scaling law to any CSV of runs (cellscale's results.csv by default).",
                       parents=[_quiet_parent()], formatter_class=RAW,
                       epilog=_examples(
                           "cellscale fit sweep/results.csv --law power-floor --json",
                           "cellscale fit sweep/results.csv --law chinchilla --x params,train_cells --bootstrap 200",
                       ))
    f.add_argument("table", help="CSV with one row per run")
    # no choices= for these three: an unknown name is the fit's one-line error, which lists them
    f.add_argument("--law", default=default.law, help=f"one of {', '.join(LAW_NAMES)} (default %(default)s)")
    f.add_argument("--method", default=default.method, help=f"one of {', '.join(METHOD_NAMES)} (default %(default)s)")
    f.add_argument("--interval", default=default.interval,
                   help=f"interval method, one of {', '.join(literal_values(FitConfig, 'interval'))} (default "
                        f"{default_interval(default.method)}; {default_interval('paper')} for --method paper; "
                        "coverage measured in docs/intervals.md)")
    f.add_argument("--x", help="comma-separated x column(s) (default params, or params,train_cells)")
    f.add_argument("--y", help="loss column (default: test_mse, or test_loss for a likelihood; the validation column "
                   "where the table has no test loss)")
    f.add_argument("--bootstrap", type=int, default=default.bootstrap,
                   help=f"bootstrap resamples (default {default.bootstrap})")
    f.add_argument("--seed", type=int, default=default.seed)
    f.add_argument("--jobs", type=int, default=None,
                   help="processes for the bootstrap (default: one per CPU; results do not depend on it)")
    f.add_argument("--json", action="store_true", help="print one JSON object")


def _add_report(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="write SWEEP_DIR/report.html and report.md", parents=[_quiet_parent()],
                       formatter_class=RAW,
                       description="Write SWEEP_DIR/report.html (self-contained), report.md, figures/ and "
                                   "fit.json from a sweep directory; rerun it any time, it never trains.",
                       epilog=_examples("cellscale report sweep"))
    r.add_argument("sweep_dir")


def _add_embed(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "embed", help="write a run's cell embedding into an .h5ad (obsm['X_cellscale'])", parents=[_quiet_parent()],
        formatter_class=RAW,
        description="Embed cells with a run's best checkpoint: the mean over the V genes of the final hidden state, "
                    "nothing masked. New cells are preprocessed as the run's dataset was (library size over all "
                    "their genes, the same target sum, log1p, the dataset's genes matched by name or feature_id), "
                    "from the run's own registry.json: the run directory is enough. "
                    "The output is the input with obsm['X_cellscale'] and uns['cellscale'] (provenance), ready for "
                    "sc.pp.neighbors(adata, use_rep='X_cellscale').",
        epilog=_examples(
            "cellscale embed sweep/runs/XS-dall-s0 --input cells.h5ad --out embedded.h5ad",
            "cellscale embed sweep/runs/XS-dall-s0 --data sweep/dataset --out dataset-embedded.h5ad",
            "cellscale embed runs/xs --input cells.h5ad --out embedded.h5ad --allow-missing-genes",
        ),
    )
    e.add_argument("run_dir", help="a run directory with best.safetensors (e.g. SWEEP_DIR/runs/<id>)")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="an .h5ad of raw counts (X, or --layer)")
    src.add_argument("--data", help="a cellscale dataset directory (all its cells; obs gains 'split')")
    e.add_argument("--out", required=True, help="the .h5ad to write")
    e.add_argument("--layer", help="read the counts from this layer of --input instead of X")
    e.add_argument("--dataset", help="the dataset the run was trained on, checked against the run's registry.json "
                                     "(needed only for a run from before it that no sweep.json above names)")
    e.add_argument("--allow-missing-genes", action="store_true",
                   help="embed with zeros for model genes the file lacks (their count is printed)")
    e.add_argument("--device", help="torch device (default: cuda when present, else cpu)")


def _add_downstream(sub: argparse._SubParsersAction) -> None:
    from cellscale.config import DOWNSTREAM_BATCH_KEYS as BATCH_KEYS
    from cellscale.config import DOWNSTREAM_LABEL as LABEL_DEFAULT

    d = sub.add_parser(
        "downstream", help="score a sweep's embeddings downstream (probe, kNN, batch mixing)",
        parents=[_quiet_parent()], formatter_class=RAW,
        description="Score every finished run of a sweep (a sweep does this itself after each run, on "
                    "'cell_type'): a logistic-regression probe and kNN label transfer fitted on the training "
                    "cells' embeddings and scored on validation and test, and kNN batch mixing; the same for "
                    "PCA-50 and the HVG values (SWEEP_DIR/downstream.json). Rewrites result.json and results.csv; "
                    "then run `cellscale report`.",
        epilog=_examples("cellscale downstream sweep --label cell_type --batch-key dataset_id",
                         "cellscale downstream sweep --label tissue --force"),
    )
    d.add_argument("sweep_dir")
    d.add_argument("--label", default=LABEL_DEFAULT, help="obs column of the labels (default %(default)s)")
    d.add_argument("--batch-key", help=f"obs column of the batches (default: the first of {', '.join(BATCH_KEYS)} "
                                       "with two values or more)")
    d.add_argument("--force", action="store_true", help="rescore runs already scored")


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run", help="the whole flow (default preset 'demo' runs offline)", parents=[_quiet_parent()],
        formatter_class=RAW,
        description="Dataset -> sweep -> fit -> report in one command, from a preset or a study YAML. "
                    "Rerunning the same command resumes.",
        epilog=_examples(
            "cellscale run                                  # preset demo, offline",
            "cellscale run --preset smoke --out smoke-out",
            "cellscale run --config my-study.yaml --out my-study",
            "cellscale run --list-presets",
        ),
    )
    run.add_argument("--preset", help="a preset name (see --list-presets); default demo")
    run.add_argument("--config", help="a study YAML instead of a preset")
    run.add_argument("--out", help="output directory (default cellscale-out/<preset>)")
    run.add_argument("--backend", choices=_backends())
    _add_workers(run)
    run.add_argument("--ray-address")
    run.add_argument("--overwrite", action="store_true")
    run.add_argument("--list-presets", action="store_true", help="print the presets and exit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cellscale", description="Scaling laws for masked-reconstruction transformers "
        "on single-cell expression: data -> sweep -> fitted law -> report.",
        epilog=EPILOG, formatter_class=RAW,
    )
    p.add_argument("--version", action="version", version=f"cellscale {__version__}")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bars or per-run lines; results are still printed "
                        "(also accepted after the subcommand)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="threads per pool for torch and BLAS (default: the CPUs this process may use; "
                        "also accepted after the subcommand)")
    sub = p.add_subparsers(dest="cmd", required=True)
    # in the order `cellscale --help` lists them
    for add in (_add_data, _add_ladder, _add_train, _add_sweep, _add_fit, _add_report, _add_embed, _add_downstream,
                _add_run):
        add(sub)
    return p


# ----------------------------------------------------------------------------- commands
#
# Each command: parse its flags -> resolve the settings -> one call -> print. The logic lives in
# the package (cellscale.config, cellscale.data, cellscale.sweep, ...); imports are made inside
# the commands so `cellscale --help` and a bad config never import torch.


def _quiet(a: argparse.Namespace) -> bool:
    return bool(getattr(a, "quiet", False))


def _given(**flags: Any) -> dict[str, Any]:
    """The flags that were given (argparse leaves the others None)."""
    return {key: value for key, value in flags.items() if value is not None}


@contextlib.contextmanager
def _silenced(quiet: bool) -> Iterator[None]:
    """Under --quiet, hush the progress console (status lines of the sweep, build bars) and
    rich's global console; results are printed after this block."""
    if not quiet:
        yield
        return
    import rich

    from cellscale.runtime.progress import set_quiet

    glob = rich.get_console()
    before = glob.quiet
    glob.quiet = True
    try:
        with set_quiet(True):
            yield
    finally:
        glob.quiet = before


def _print_gene_mean(manifest: dict[str, Any]) -> None:
    gm = (manifest.get("baselines") or {}).get("gene_mean") or {}
    if gm:
        print(f"gene-mean baseline MSE: validation {gm['val']:.4f}, test {gm['test']:.4f}")


def _data_build_flags(a: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(data settings, census settings) of the `data build` flags that were given."""
    settings = {"normalized": a.normalized,
                **_given(source=a.source, genes=a.genes, cells=a.cells, seed=a.seed, dtype=a.dtype, input=a.input,
                         layer=a.layer, split_by=a.split_by, hvg_batch_key=a.hvg_batch_key)}
    tissues = None if a.tissues is None else [t.strip() for t in a.tissues.split(",") if t.strip()]
    census = _given(uri=a.census_uri, version=a.census_version, organism=a.organism,
                    obs_filter=a.obs_filter, per_tissue_cap=a.per_tissue_cap, tissues=tissues)
    return settings, census


def cmd_data_build(a: argparse.Namespace) -> int:
    from cellscale.config import DataConfig, data_config_with, load_study_config
    from cellscale.data.build import build_dataset
    from cellscale.data.store import Dataset

    if not a.config:
        missing = [f"--{k}" for k in ("source", "genes", "cells") if getattr(a, k) is None]
        if missing:
            raise CellscaleError(f"data build needs {', '.join(missing)} (or --config with a data section)")
    base = load_study_config(a.config).data if a.config else DataConfig()
    cfg = data_config_with(base, *_data_build_flags(a))
    path = build_dataset(cfg, out=Path(a.out), overwrite=a.overwrite, progress=not _quiet(a))
    m = Dataset.open(path).manifest
    print(f"dataset: {path}  ({m.get('D')} cells x {m.get('V')} genes; splits {m.get('split_sizes')})")
    _print_gene_mean(m)
    return 0


def cmd_data_thin(a: argparse.Namespace) -> int:
    from cellscale.data.store import Dataset
    from cellscale.data.thin import thin_dataset

    parent = Dataset.open(a.dataset_dir)  # verified in full before a byte is thinned
    path = thin_dataset(parent, fraction=a.fraction, seed=a.seed, out=Path(a.out), overwrite=a.overwrite,
                        progress=not _quiet(a))
    thinned = Dataset.open(path, verify="none")  # just written (or verified when reused)
    m = thinned.manifest
    print(f"dataset: {path}  ({m.get('D')} cells x {m.get('V')} genes; depth fraction {m['depth_fraction']:g}, "
          f"mean library size {parent.library_size.mean():.1f} -> {thinned.library_size.mean():.1f})")
    _print_gene_mean(m)
    return 0


def cmd_data_info(a: argparse.Namespace) -> int:
    from cellscale.data.info import dataset_info, info_table

    info = dataset_info(a.dataset_dir)
    if a.json:
        from cellscale.runtime.io import to_json

        print(to_json(info, indent=None))
        return 0
    print("\n".join(info_table(info)))
    return 0


def cmd_ladder(a: argparse.Namespace) -> int:
    from cellscale.model.ladder import ladder_table

    rows = ladder_table(a.genes)
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"model ladder at V = {a.genes} genes (params include the gene-embedding table)")
    print(f"{'size':<6} {'d':>5} {'L':>3} {'H':>3} {'FFN':>4} {'params':>14} {'non-emb':>14} {'train GFLOP/cell':>17}")
    for r in rows:
        print(f"{r['size']:<6} {r['d_model']:>5} {r['n_layers']:>3} {r['n_heads']:>3} {r['ffn_ratio']:>4} "
              f"{r['params']:>14,} {r['non_embedding_params']:>14,} {r['flops_per_cell'] / 1e9:>17.4f}")
    return 0


def _train_flags(a: argparse.Namespace) -> dict[str, Any]:
    """The `train` flags that set training settings; one not given leaves the config's value."""
    return {**_given(cells_seen=a.cells_seen, batch_size=a.batch_size, lr=a.lr, schedule=a.schedule,
                     device=a.device, precision=a.precision, checkpoint_minutes=a.checkpoint_minutes),
            **({"compile": True} if a.compile else {})}


def _is_main_rank() -> bool:
    """False on the other ranks under torchrun: only rank 0 reports."""
    from cellscale.runtime.distributed import dist_env

    env = dist_env()
    return env is None or env[1] == 0


def _train_with_progress(ds: Any, spec: Any, *, out: str, overwrite: bool, progress: bool) -> dict[str, Any]:
    """``train_run`` of one resolved run, with the sweep's progress bar for one run."""
    from cellscale.runtime.progress import SweepProgress
    from cellscale.train import train_run

    with SweepProgress(1, enabled=progress) as bar:
        hook = bar.run_started(spec)
        result = train_run(ds, spec.model, spec.train, out=out, train_cells=spec.train_cells, seed=spec.seed,
                           on_step=hook, overwrite=overwrite)
        bar.run_finished(spec, result)
    return result


def cmd_train(a: argparse.Namespace) -> int:
    from cellscale.config import StudyConfig, load_study_config

    # a bad config is refused before torch and the data layer are even imported
    study = load_study_config(a.config) if a.config else StudyConfig()
    from cellscale.data.store import Dataset
    from cellscale.runtime.progress import console, score_line
    from cellscale.train.spec import resolve_run

    ds = Dataset.open(a.data)
    # the settings the sweep of --config gives this run, then the flags on top
    spec = resolve_run(study, size=a.size, n_genes=ds.n_genes, n_train=int(ds.splits["train"].size),
                       train_cells=a.train_cells, seed=a.seed, run_name=Path(a.out).name,
                       model_flags=_given(objective=a.objective), train_flags=_train_flags(a))
    main_rank = _is_main_rank()
    result = _train_with_progress(ds, spec, out=a.out, overwrite=a.overwrite,
                                  progress=main_rank and not _quiet(a))
    if main_rank:
        if _quiet(a) and result.get("status") == "ok":
            print(f"{a.size}: {score_line(result)}")
        console.print(f"result: {Path(a.out) / 'result.json'}")
    return 0 if result.get("status") == "ok" else 1


def cmd_sweep(a: argparse.Namespace) -> int:
    from cellscale.config import load_study_config

    cfg = load_study_config(a.config)  # refused before torch and the data layer are imported
    from cellscale.sweep import run_sweep

    with _silenced(_quiet(a)):
        path = run_sweep(cfg, out=a.out, backend=a.backend, ray_address=a.ray_address,
                         overwrite=a.overwrite, progress=not _quiet(a), workers=a.workers)
    print(f"results: {path}")
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    from cellscale.fit import fit_csv
    from cellscale.runtime.io import to_json

    x = [c.strip() for c in a.x.split(",")] if a.x else None
    res = fit_csv(a.table, law=a.law, method=a.method, x=x, y=a.y, bootstrap=a.bootstrap,
                  seed=a.seed, n_jobs=a.jobs, interval=a.interval)
    d = res.to_dict()
    if a.json:
        print(to_json(d, indent=None))
        return 0
    from cellscale.fit.text import format_fit

    print("\n".join(format_fit(d)))
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from cellscale.report.writer import write_report
    from cellscale.runtime.progress import ResampleProgress

    sweep_dir = Path(a.sweep_dir)
    if not (sweep_dir / "results.csv").is_file():
        raise CellscaleError(f"{sweep_dir} has no results.csv; run `cellscale sweep` into it first")
    with ResampleProgress() as bar:
        html, md = write_report(sweep_dir, progress=bar)
    print(f"report: {html}\nreport: {md}")
    return 0


def cmd_embed(a: argparse.Namespace) -> int:
    from cellscale.downstream.embedding import embed_run

    with _silenced(_quiet(a)):
        prov = embed_run(a.run_dir, out=a.out, input=a.input, data=a.data, dataset=a.dataset, layer=a.layer,
                         allow_missing=a.allow_missing_genes, device=a.device)
    if prov["n_missing_genes"]:
        print(f"{prov['n_missing_genes']} of the model's {prov['n_genes']} genes are missing from the input: "
              "embedded with zeros for them")
    print(f"embedded {prov['n_cells']} cells ({prov['d_model']} dimensions, obsm['{prov['key']}']): {a.out}")
    return 0


def cmd_downstream(a: argparse.Namespace) -> int:
    from cellscale.sweep.scoring import rewrite_results, score_sweep

    with _silenced(_quiet(a)):
        done = score_sweep(a.sweep_dir, label=a.label, batch_key=a.batch_key, force=a.force)
    path = rewrite_results(a.sweep_dir)
    print(f"scored {len(done)} run(s) on '{a.label}'; results: {path}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from cellscale.config import list_presets
    from cellscale.pipeline import print_summary, resolve_config, run_study

    if a.list_presets:
        for name in list_presets():
            print(name)
        return 0
    if a.preset and a.config:
        raise CellscaleError("give --preset or --config, not both")
    cfg = resolve_config(preset=a.preset, config=a.config)
    # a study YAML's output is named after its study, a preset's after the preset
    out = Path(a.out or Path("cellscale-out") / (a.preset or (cfg.name if a.config else "demo")))
    with _silenced(_quiet(a)):
        summary = run_study(cfg, out=out, backend=a.backend, ray_address=a.ray_address,
                            overwrite=a.overwrite, progress=not _quiet(a), workers=a.workers)
    print_summary(summary)
    return 0


DATA_COMMANDS = {"build": cmd_data_build, "info": cmd_data_info, "thin": cmd_data_thin}
COMMANDS = {
    "ladder": cmd_ladder, "train": cmd_train, "sweep": cmd_sweep, "fit": cmd_fit,
    "report": cmd_report, "run": cmd_run, "embed": cmd_embed, "downstream": cmd_downstream,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prepare_threads(getattr(args, "threads", None))  # before anything loads torch
    try:
        if args.cmd == "data":
            return DATA_COMMANDS[args.data_cmd](args)
        return COMMANDS[args.cmd](args)
    except CellscaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        print(f"error: {err.strerror}: {err.filename}", file=sys.stderr)
        return 2
    except Preempted as err:  # SIGTERM or SIGINT: the work is checkpointed (cellscale.runtime.preempt)
        ignore_stop_signals()
        if _is_main_rank():
            print(err, file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
