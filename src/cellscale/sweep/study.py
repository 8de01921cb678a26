"""A sweep directory: its config, its dataset, its runs and its results table."""

from __future__ import annotations

import contextlib
import functools
import shutil
from pathlib import Path

from cellscale.config import (
    ConfigError,
    StudyConfig,
    config_hash,
    depth_label,
    dump_yaml,
    identity_dump,
    load_study_config,
)
from cellscale.data.baselines import load_or_compute_baselines
from cellscale.data.build import build_dataset
from cellscale.data.store import Dataset
from cellscale.data.thin import check_thinnable, is_thinned_from, thin_dataset
from cellscale.errors import RunError
from cellscale.runtime.io import DamagedFile, atomic_write_json, atomic_write_text, read_json_checked, warn
from cellscale.runtime.preempt import stop_on_signals
from cellscale.runtime.progress import SweepProgress, console
from cellscale.schema import RUNS_DIR
from cellscale.sweep.lrsearch import later_runs, planned_count, search_runs, searches_first_seed, waiting_groups
from cellscale.sweep.plan import plan_runs
from cellscale.sweep.pool import run_pool, worker_count
from cellscale.sweep.results import write_results
from cellscale.sweep.runner import run_local, run_ray, threads_per_run
from cellscale.sweep.scoring import score_result, score_sweep
from cellscale.train.rundir import finished_result


def sweep_hash(cfg: StudyConfig) -> str:
    """The config hash a sweep dir is claimed with. A setting added since sweeps were first
    written and left at its "as before" value is not hashed (``config.ADDED_SETTINGS_OFF``), so
    a sweep written before it existed still resumes."""
    payload = cfg.model_dump(mode="json")
    for section in ("train", "sweep", "fit"):
        payload[section] = identity_dump(section, getattr(cfg, section))
    return config_hash(payload)


def _marker_hash(out: Path, cfg: StudyConfig, *, overwrite: bool) -> str | None:
    """The config hash ``out/sweep.json`` records. A damaged sweep.json stands for this config
    when ``config.yaml`` is this config's (one line says so); otherwise it is refused
    (DamagedFile), or, with ``overwrite``, taken as another config's (None)."""
    try:
        return read_json_checked(out / "sweep.json").get("config_hash")
    except DamagedFile as err:
        saved = out / "config.yaml"
        if saved.is_file() and saved.read_text(encoding="utf-8", errors="replace") == dump_yaml(cfg):
            warn(f"{err}; config.yaml is this config's, so the sweep goes on and rewrites it")
            return sweep_hash(cfg)
        if overwrite:
            return None
        raise err.with_fix("use another --out, or --overwrite to start the sweep over") from None


def prepare_sweep_dir(cfg: StudyConfig, out: Path, *, overwrite: bool = False) -> None:
    """Claim ``out`` for this config: refuse a directory that holds something else."""
    marker = out / "sweep.json"
    if out.exists() and not out.is_dir():
        if not overwrite:
            raise RunError(f"{out} is a file, not a sweep directory; use another --out, or --overwrite")
        out.unlink()
    if out.exists() and any(out.iterdir()):
        stored = _marker_hash(out, cfg, overwrite=overwrite) if marker.is_file() else None
        if marker.is_file():
            if stored != sweep_hash(cfg) and not overwrite:
                raise RunError(
                    f"{out} holds a sweep with another config; use another --out, or --overwrite"
                )
        elif not overwrite:
            raise RunError(f"{out} is not empty and is not a cellscale sweep; use another --out, or --overwrite")
        if overwrite and stored != sweep_hash(cfg):
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"config_hash": sweep_hash(cfg), "dataset": None})
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))


def _baselines_readable(path: Path) -> bool:
    """SWEEP_DIR/baselines.json is there and reads; a damaged one is recomputed (one line)."""
    if not path.is_file():
        return False
    try:
        read_json_checked(path, keys=("gene_mean",))
    except DamagedFile as err:
        warn(f"{err}: computing the baselines again")
        return False
    return True


def ensure_dataset(cfg: StudyConfig, out: Path) -> Path:
    if cfg.dataset:
        path = Path(cfg.dataset).expanduser().resolve()
        Dataset.open(path)  # refuses a missing, changed or truncated dataset
        return path
    path = out / "dataset"
    if (path / "manifest.json").is_file():
        return path.resolve()
    console.print(f"building dataset ({cfg.data.source}, V={cfg.data.genes}, D={cfg.data.cells}) -> {path}")
    return build_dataset(cfg.data, out=path, overwrite=True).resolve()


def depth_dataset_dir(out: Path, depth: float) -> Path:
    """Where a sweep keeps its dataset thinned to ``depth``: ``SWEEP_DIR/datasets/depth-{depth}``."""
    return out / "datasets" / f"depth-{depth_label(depth)}"


def check_depth_axis(cfg: StudyConfig, given: Dataset | None) -> None:
    """Refuse, before anything is written, a depth axis on data that has no counts to thin."""
    if all(float(d) == 1.0 for d in cfg.sweep.depths):
        return
    if given is not None:
        check_thinnable(given)
    elif cfg.data.normalized or (cfg.data.source == "simulate" and cfg.data.simulate.mode == "gaussian"):
        what = "normalised input" if cfg.data.normalized else "the gaussian simulator mode"
        raise ConfigError(f"sweep.depths thins raw counts, but the data section builds from {what}, "
                          "which has none: drop sweep.depths or build from counts")


def ensure_depth_datasets(cfg: StudyConfig, out: Path, base: Dataset, *, progress: bool = False) -> dict[float, str]:
    """{depth: dataset dir} for every depth of the sweep: the base dataset at 1.0, each other
    depth thinned from it once (a complete one from an earlier, interrupted sweep is reused)
    with its baselines cached in its own ``baselines.json``. Thinning is seeded by the base
    dataset's seed, so the same config gives the same thinned counts."""
    paths: dict[float, str] = {}
    for depth in cfg.sweep.depths:
        if float(depth) == 1.0:
            paths[1.0] = str(base.path)
            continue
        target, seed = depth_dataset_dir(out, depth), int(base.manifest.get("seed", 0))
        # a match is reused by thin_dataset (a truncated one is refused, not trained on);
        # anything else there (another base or seed) is the sweep's own dir: replaced
        reuse = is_thinned_from(target, base, fraction=float(depth), seed=seed)
        if not reuse:
            console.print(f"thinning the dataset to depth {depth_label(depth)} -> {target}")
        path = thin_dataset(base, fraction=float(depth), seed=seed, out=target, overwrite=not reuse,
                            progress=progress)
        load_or_compute_baselines(Dataset.open(path, verify="none"))
        paths[float(depth)] = str(path.resolve())
    return paths


def _finished(out: Path, specs: list) -> list[dict]:
    """The finished results on disk of ``specs`` (a rerun's starting point), read quietly: the
    runner names a damaged one when it redoes the run."""
    return [r for s in specs if (r := finished_result(out / RUNS_DIR / s.run_id / "result.json", quiet=True))]


def _listed(specs: list, *batches: list) -> list[str]:
    """The run ids of ``batches``, in plan order."""
    keep = {s.run_id for batch in batches for s in batch}
    return [s.run_id for s in specs if s.run_id in keep]


def run_sweep(
    cfg: StudyConfig | str | Path, *, out: str | Path, backend: str | None = None,
    ray_address: str | None = None, overwrite: bool = False, progress: bool = True,
    ray_num_cpus: int | None = None, workers: int | str | None = None,
) -> Path:
    """Build (or reuse) the dataset, train every planned run, write ``results.csv``.

    ``results.csv`` is rewritten atomically after every finished run (plan order, one row per
    run with a result), so a killed sweep leaves a complete table of what finished, and a
    rerun skips those runs and resumes the interrupted one from its checkpoint.
    ``ray_num_cpus`` caps a local Ray cluster (default: every core); ``workers`` replaces
    ``sweep.workers`` (local runs at once)."""
    if not isinstance(cfg, StudyConfig):
        cfg = load_study_config(cfg)
    out = Path(out)
    # refuse a bad config before anything is written: sizes, overrides, an existing dataset
    # (opened and verified once, here)
    given = Dataset.open(Path(cfg.dataset).expanduser().resolve()) if cfg.dataset else None
    plan_runs(cfg, n_genes=given.n_genes if given is not None else cfg.data.genes)
    check_depth_axis(cfg, given)
    fresh = not out.exists() or (out.is_dir() and not any(out.iterdir()))
    prepare_sweep_dir(cfg, out, overwrite=overwrite)
    try:
        dataset = given.path if given is not None else ensure_dataset(cfg, out)
    except BaseException:
        if fresh:  # nothing of ours to keep: a rerun with a fixed config starts clean
            shutil.rmtree(out, ignore_errors=True)
        raise
    ds = given if given is not None else Dataset.open(dataset)
    if not _baselines_readable(out / "baselines.json"):
        # reference predictors drawn on every figure: gene mean, Bayes-linear, kNN
        base = load_or_compute_baselines(ds)
        atomic_write_json(out / "baselines.json",
                          {k: v for k, v in base.items()
                           if k in ("gene_mean", "bayes_linear", "knn", "bayes_floor", "likelihood", "n_masked")})
    datasets = ensure_depth_datasets(cfg, out, ds, progress=progress)
    meta: dict = {"dataset": str(dataset), "config_hash": sweep_hash(cfg)}
    if set(datasets) != {1.0}:  # the report finds each depth's manifest and baselines here
        meta["depth_datasets"] = {depth_label(d): p for d, p in sorted(datasets.items(), reverse=True) if d != 1.0}
    atomic_write_json(out / "sweep.json", meta)
    specs = plan_runs(cfg, n_genes=ds.n_genes, n_train=int(ds.splits["train"].size))
    first = search_runs(cfg, specs)
    # the runs results.csv lists, in plan order: the rate search's, and the later seeds' of the groups
    # already chosen (so a rerun's table keeps them while the search's runs finish)
    ids = _listed(specs, first, later_runs(cfg, specs, _finished(out, first)) if searches_first_seed(cfg) else [])
    backend = backend or cfg.sweep.backend

    ds_cache: dict = {}

    def on_result(result: dict) -> None:
        # the downstream step: the run's embedding scored into its result.json (train stays model-only)
        score_result(out / RUNS_DIR / str(result.get("run_id")), datasets, cache=ds_cache)
        write_results(out, ids)

    def train(batch: list) -> list[dict]:
        if backend == "ray":
            return run_ray(batch, dataset=datasets, sweep_dir=str(out), address=ray_address,
                           num_cpus_per_run=cfg.sweep.num_cpus_per_run,
                           num_gpus_per_run=cfg.sweep.num_gpus_per_run, num_cpus=ray_num_cpus,
                           progress=bar, on_result=on_result)
        if (n := worker_count(workers or cfg.sweep.workers, cfg.sweep.num_cpus_per_run)) > 1:
            return run_pool(batch, dataset=datasets, sweep_dir=str(out), workers=n,
                            threads=threads_per_run(cfg.sweep.num_cpus_per_run), progress=bar,
                            on_result=on_result, finish=functools.partial(score_result, datasets=datasets))
        return run_local(batch, dataset=datasets, sweep_dir=str(out), progress=bar, on_result=on_result)

    # one stop flag for both passes of a first-seed rate search, so that a signal between them stops
    # the second before its first run (Ray sets its own handlers)
    signals = stop_on_signals() if backend != "ray" and searches_first_seed(cfg) else contextlib.nullcontext()
    with signals, SweepProgress(planned_count(cfg, specs), enabled=progress) as bar:
        results = train(first)
        later = later_runs(cfg, specs, results)  # sweep.lr_search first-seed: the other seeds at the chosen rate
        if waiting := waiting_groups(cfg, specs, results):
            warn(f"the later seeds of {', '.join(waiting)} wait for their first-seed runs, which failed: "
                 "rerun the same command once the cause is fixed")
        ids[:] = _listed(specs, first, later)
        if later:
            train(later)
    score_sweep(out, datasets, run_ids=ids)  # runs finished before this step existed; the references
    return write_results(out, ids)
