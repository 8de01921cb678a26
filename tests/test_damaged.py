"""Damaged files are recognised, never a traceback: a checkpoint, best weights, result.json,
metrics.jsonl, results.csv, sweep.json, baselines.json and the dataset's files, cut short,
changed, or edited by hand. A run falls back to the checkpoint before (or says how to start
over), a sweep redoes a run whose result is damaged, ``report`` and ``fit`` refuse a damaged
file in one line naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cellscale.cli import main
from cellscale.runtime.io import DamagedFile, atomic_write_text_checked, checksum_path, verify_checksum

STUDY = {"train": {"cells_seen": 32 * 40, "batch_size": 32, "eval_every": 8, "checkpoint_every": 8,
                   "eval_batch_size": 64, "num_threads": 1, "device": "cpu"}}
SWEEP = {"sweep": {"sizes": ["XXS"], "seeds": [0, 1]},
         "train": {"cells_seen": 256, "batch_size": 32, "eval_every": 4, "num_threads": 1, "device": "cpu"}}
VOLATILE = {"wall_seconds", "total_wall_seconds", "resumed_at", "num_threads"}


def _cli(capsys, *args: str) -> tuple[int, str]:
    """cellscale's CLI in this process: (exit code, stderr); never a traceback."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def _one_error(rc: int, err: str, *needles: str) -> str:
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 2 and len(errors) == 1, (rc, err)
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _warning(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("warning: ") and all(n in ln for n in needles)]
    assert len(lines) == 1, err
    return lines[0]


def _truncate(path: Path, keep: float = 0.5) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])


def _flip_last_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # same size: only a checksum can tell
    path.write_bytes(bytes(blob))


def _same_result(got: dict, ref: dict) -> None:
    for key, value in ref.items():
        if key not in VOLATILE and key != "run_id":
            assert got[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key


# ------------------------------------------------------------------------------------- one run


@pytest.fixture(scope="module")
def finished_run(tiny_dataset_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(a finished run dir, its study yaml): 40 steps, checkpoints every 8 (do not modify)."""
    root = tmp_path_factory.mktemp("damaged-run")
    study = root / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    run = root / "run"
    assert main(["train", "--data", str(tiny_dataset_dir), "--size", "XS", "--seed", "2", "--config", str(study),
                 "--out", str(run), "-q"]) == 0
    return run, study


@pytest.fixture()
def run_copy(finished_run, tmp_path: Path, tiny_dataset_dir: Path):
    """(train args, run dir, reference result): a copy of the finished run, its result removed
    (so that the rerun resumes from its checkpoint, re-scores, and writes it again)."""
    src, study = finished_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ref = json.loads((run / "result.json").read_text())
    (run / "result.json").unlink()
    args = ("train", "--data", tiny_dataset_dir, "--size", "XS", "--seed", "2", "--config", study, "--out", run, "-q")
    return args, run, ref


def test_the_checkpoint_before_is_kept(finished_run):
    run, _ = finished_run
    for name in ("checkpoint", "checkpoint.prev"):
        assert sorted(p.name for p in (run / name).iterdir()) == ["model.safetensors", "optim.safetensors",
                                                                   "state.json"]
    step = {n: json.loads((run / n / "state.json").read_text())["loop"]["step"] for n in ("checkpoint", "checkpoint.prev")}
    assert step == {"checkpoint": 40, "checkpoint.prev": 32}
    assert not (run / "checkpoint.old").exists() and not list(run.glob(".checkpoint.*"))


def test_the_rotation_survives_a_kill_and_never_keeps_an_incomplete_checkpoint(tmp_path: Path):
    import torch

    from cellscale.runtime.checkpoint import clean_stale, find_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    ck = tmp_path / "checkpoint"

    def save(step: int) -> None:
        save_checkpoint(ck, model=model, optimizer=opt, loop_state={"step": step})

    def steps() -> dict[str, int]:
        return {p.name: json.loads((p / "state.json").read_text())["loop"]["step"]
                for p in tmp_path.iterdir() if (p / "state.json").is_file()}

    for step in (1, 2, 3):
        save(step)
    assert steps() == {"checkpoint": 3, "checkpoint.prev": 2} and not list(tmp_path.glob(".checkpoint.*"))
    # killed after the new checkpoint's rename, before the rotation: the resume finishes it
    (tmp_path / "checkpoint.prev").rename(tmp_path / "checkpoint.old")
    clean_stale(ck)
    assert steps() == {"checkpoint": 3, "checkpoint.prev": 2}
    # a newest checkpoint missing a file (a copy broken off): skipped, and not kept as the one before
    (ck / "state.json").unlink()
    assert find_checkpoint(ck) == tmp_path / "checkpoint.prev"
    save(4)
    assert steps() == {"checkpoint": 4, "checkpoint.prev": 2} and not list(tmp_path.glob(".checkpoint.*"))


@pytest.mark.parametrize("name,damage", [
    ("model.safetensors", _truncate), ("optim.safetensors", _truncate), ("state.json", _truncate),
    ("model.safetensors", _flip_last_byte), ("optim.safetensors", _flip_last_byte),
])
def test_a_damaged_checkpoint_gives_way_to_the_one_before(capsys, run_copy, name, damage):
    args, run, ref = run_copy
    damage(run / "checkpoint" / name)
    rc, err = _cli(capsys, *args)
    assert rc == 0, err
    _warning(err, f"{run / 'checkpoint' / name} is damaged", "resuming from the checkpoint before it",
             "checkpoint.prev, step 32")
    got = json.loads((run / "result.json").read_text())
    _same_result(got, ref)  # the steps after the older checkpoint are redone exactly
    assert got["resumed_at"] == [32]
    assert (run / "checkpoint.damaged" / name).is_file()  # set aside, out of the rotation
    assert json.loads((run / "checkpoint.prev" / "state.json").read_text())["loop"]["step"] == 32


def test_a_hand_edited_state_json_is_caught_by_its_checksum(capsys, run_copy):
    args, run, _ = run_copy
    path = run / "checkpoint" / "state.json"
    doc = json.loads(path.read_text())
    doc["loop"]["step"] = 39  # still valid JSON, still a loop state
    path.write_text(json.dumps(doc))
    rc, err = _cli(capsys, *args)
    assert rc == 0, err
    _warning(err, "state.json is damaged", "differs from the checksum")


def test_with_no_good_checkpoint_the_run_says_how_to_start_over(capsys, run_copy):
    args, run, ref = run_copy
    _truncate(run / "checkpoint" / "model.safetensors")
    _flip_last_byte(run / "checkpoint.prev" / "optim.safetensors")
    rc, err = _cli(capsys, *args)
    _one_error(rc, err, str(run / "checkpoint" / "model.safetensors"), "is damaged",
               "no earlier checkpoint is readable", "--overwrite")
    rc, err = _cli(capsys, *args, "--overwrite")  # starts over (same settings, but it cannot resume)
    assert rc == 0, err
    _warning(err, "is damaged", "--overwrite starts the run over")
    got = json.loads((run / "result.json").read_text())
    _same_result(got, ref)
    assert got["resumed_at"] == []


def test_damaged_best_weights_are_named(capsys, run_copy):
    args, run, ref = run_copy
    _truncate(run / "best.safetensors")
    rc, err = _cli(capsys, *args)
    _one_error(rc, err, str(run / "best.safetensors"), "is damaged", "--overwrite")
    rc, err = _cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    _same_result(json.loads((run / "result.json").read_text()), ref)


@pytest.mark.parametrize("text", ['{"run_id": "XS", "stat', "[1, 2]", '{"run_id": "XS"}', "\xff\xfe"])
def test_a_damaged_result_is_redone_from_the_checkpoint(capsys, run_copy, text):
    args, run, ref = run_copy
    (run / "result.json").write_text(text, encoding="latin-1")
    rc, err = _cli(capsys, *args)
    assert rc == 0, err
    _warning(err, f"{run / 'result.json'} is damaged", "taken as unfinished", "from its checkpoint")
    _same_result(json.loads((run / "result.json").read_text()), ref)


def test_a_damaged_config_json_is_named(capsys, run_copy):
    args, run, _ = run_copy
    (run / "config.json").write_text('{"hash": "ab')
    rc, err = _cli(capsys, *args)
    _one_error(rc, err, str(run / "config.json"), "is damaged", "--overwrite")


def test_damaged_metric_lines_are_marked_lost_and_the_run_goes_on(capsys, run_copy):
    args, run, ref = run_copy
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = '{"kind": "train", "st\n'  # an unreadable line before the checkpoint
    path.write_text("".join(lines[:-1]))  # and the last one (the checkpoint counts it) cut off
    rc, err = _cli(capsys, *args)
    assert rc == 0, err
    _warning(err, f"{path} is damaged", f"2 of the {len(lines)} lines", "marked lost")
    again = path.read_text().splitlines()
    assert len(again) == len(lines)  # the log still lines up with the checkpoint
    assert json.loads(again[2]) == {"kind": "lost"} and json.loads(again[-1]) == {"kind": "lost"}
    _same_result(json.loads((run / "result.json").read_text()), ref)


# ----------------------------------------------------------------------------------- a sweep


@pytest.fixture(scope="module")
def finished_sweep(tiny_dataset_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(a finished sweep dir, its config): two XXS runs (do not modify)."""
    root = tmp_path_factory.mktemp("damaged-sweep")
    cfg = root / "sweep.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": str(tiny_dataset_dir), **SWEEP}))
    assert main(["sweep", str(cfg), "--out", str(root / "sw"), "-q"]) == 0
    return root / "sw", cfg


@pytest.fixture()
def sweep_copy(finished_sweep, tmp_path: Path) -> tuple[Path, Path]:
    src, cfg = finished_sweep
    shutil.copytree(src, tmp_path / "sw")
    return tmp_path / "sw", cfg


def test_a_sweep_redoes_a_run_whose_result_is_damaged(capsys, sweep_copy):
    sw, cfg = sweep_copy
    ref = pd.read_csv(sw / "results.csv")
    # the second run's result is damaged: the first run's results.csv rewrite must skip it too
    (sw / "runs" / "XXS-dall-s1" / "result.json").write_text('{"run_id": "XXS-dall-s1", "status": "o')
    rc, err = _cli(capsys, "sweep", cfg, "--out", sw)
    assert rc == 0, err
    _warning(err, "runs/XXS-dall-s1/result.json is damaged", "taken as unfinished", "from its checkpoint")
    got = pd.read_csv(sw / "results.csv")
    for col in ("run_id", "status", "steps", "best_val_mse", "test_mse"):
        pd.testing.assert_series_equal(got[col], ref[col])


def test_a_sweep_run_with_no_good_checkpoint_is_failed_with_the_way_out(capsys, sweep_copy):
    sw, cfg = sweep_copy
    run = sw / "runs" / "XXS-dall-s1"
    (run / "result.json").unlink()
    for name in ("checkpoint", "checkpoint.prev"):
        _truncate(run / name / "optim.safetensors")
    rc, err = _cli(capsys, "sweep", cfg, "--out", sw, "-q")
    assert rc == 0, err  # the sweep goes on: the run is recorded as failed, with the reason
    row = pd.read_csv(sw / "results.csv").set_index("run_id").loc["XXS-dall-s1"]
    assert row["status"] == "failed"
    assert "optim.safetensors is damaged" in row["error"] and f"by deleting {run}" in row["error"]
    shutil.rmtree(run)
    rc, err = _cli(capsys, "sweep", cfg, "--out", sw, "-q")
    assert rc == 0 and (pd.read_csv(sw / "results.csv")["status"] == "ok").all(), err


def test_a_damaged_sweep_json_is_rewritten_by_the_sweep_and_refused_by_report(capsys, sweep_copy):
    sw, cfg = sweep_copy
    (sw / "sweep.json").write_text('{"dataset": "/da')
    _one_error(*_cli(capsys, "report", sw), str(sw / "sweep.json"), "is damaged", "cellscale sweep")
    _one_error(*_cli(capsys, "downstream", sw), str(sw / "sweep.json"), "is damaged", "rerun the sweep")
    rc, err = _cli(capsys, "sweep", cfg, "--out", sw, "-q")
    assert rc == 0, err
    _warning(err, "sweep.json is damaged", "config.yaml is this config's")
    assert json.loads((sw / "sweep.json").read_text())["dataset"]
    # with another config, a damaged sweep.json cannot vouch for the directory
    (sw / "sweep.json").write_text("{")
    other = cfg.with_name("other.yaml")
    other.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "sweep": {"sizes": ["TINY"]}}))
    _one_error(*_cli(capsys, "sweep", other, "--out", sw), "sweep.json is damaged", "--overwrite")


def test_a_damaged_baselines_json_is_recomputed_by_the_sweep_and_refused_by_report(capsys, sweep_copy):
    sw, cfg = sweep_copy
    good = json.loads((sw / "baselines.json").read_text())
    (sw / "baselines.json").write_text('{"gene_mean": {"val": 1.')
    _one_error(*_cli(capsys, "report", sw), str(sw / "baselines.json"), "is damaged")
    rc, err = _cli(capsys, "sweep", cfg, "--out", sw, "-q")
    assert rc == 0, err
    _warning(err, "baselines.json is damaged", "computing the baselines again")
    assert json.loads((sw / "baselines.json").read_text()) == good


@pytest.mark.parametrize("damage", ["lost-row", "cut-mid-row", "not-csv"])
def test_report_and_fit_refuse_a_damaged_results_csv_and_the_sweep_rewrites_it(capsys, sweep_copy, damage):
    sw, cfg = sweep_copy
    csv = sw / "results.csv"
    text = csv.read_text()
    lines = text.splitlines(keepends=True)
    csv.write_text({"lost-row": "".join(lines[:-1]),  # parses: only the checksum can tell
                    "cut-mid-row": text[: len(text) - 30], "not-csv": '"\n'}[damage])
    for cmd in (("report", sw), ("fit", csv)):
        _one_error(*_cli(capsys, *cmd), f"{csv} is damaged", "cellscale sweep", "results.csv.sha256.json")
    rc, err = _cli(capsys, "sweep", cfg, "--out", sw, "-q")
    assert rc == 0, err
    assert csv.read_text() == text
    verify_checksum(csv)


def test_report_names_a_damaged_metrics_log_and_draws_the_rest(capsys, sweep_copy):
    sw, _ = sweep_copy
    path = sw / "runs" / "XXS-dall-s0" / "metrics.jsonl"
    path.write_text(path.read_text() + '{"kind": "eval", "st')
    rc, err = _cli(capsys, "report", sw)
    assert rc == 0, err
    _warning(err, f"{path} is damaged", "1 unreadable line")


# -------------------------------------------------------------- results.csv's checksum file


def test_a_rewrite_killed_between_its_two_files_is_not_damage(tmp_path: Path):
    path = tmp_path / "results.csv"
    atomic_write_text_checked(path, "a,b\n1,2\n")
    atomic_write_text_checked(path, "a,b\n1,2\n3,4\n")
    verify_checksum(path)
    # the checksum file of a third version is written, the table not yet: the old one still holds
    side = json.loads(checksum_path(path).read_text())
    atomic_write_text_checked(tmp_path / "next.csv", "a,b\n5,6\n")
    newer = json.loads(checksum_path(tmp_path / "next.csv").read_text())["sha256"]
    checksum_path(path).write_text(json.dumps({"sha256": newer, "previous": side["sha256"]}))
    verify_checksum(path)
    path.write_text("a,b\n1,2\n")  # neither the newest nor the previous one: damaged
    with pytest.raises(DamagedFile, match="differs from the checksum"):
        verify_checksum(path)
    checksum_path(path).write_text("{")
    with pytest.raises(DamagedFile, match="sha256.json is damaged"):
        verify_checksum(path)


def test_a_table_without_a_checksum_file_is_not_checked(tmp_path: Path):
    path = tmp_path / "mine.csv"
    path.write_text("a,b\n1,2\n")
    verify_checksum(path)


# ------------------------------------------------------------------------------- the dataset


def _dataset_files(ds: Path) -> list[str]:
    return [*json.loads((ds / "manifest.json").read_text())["files"], "manifest.json"]


@pytest.mark.parametrize("damage", [_truncate, _flip_last_byte])
def test_every_dataset_file_damaged_is_named(capsys, tiny_dataset_dir: Path, tmp_path: Path, damage):
    names = _dataset_files(tiny_dataset_dir)
    assert {"values.npy", "counts.npy", "library_size.npy", "splits.npz", "obs.parquet"} <= set(names)
    for name in names:
        ds = tmp_path / name / "ds"
        shutil.copytree(tiny_dataset_dir, ds)
        damage(ds / name)
        rc, err = _cli(capsys, "train", "--data", ds, "--size", "XXS", "--out", tmp_path / name / "run", "-q")
        line = _one_error(rc, err, str(ds))
        assert name in line, line
        assert not (tmp_path / name / "run").exists()


def test_a_damaged_baselines_cache_of_a_dataset_is_recomputed(capsys, tiny_dataset_dir: Path, tmp_path: Path):
    from cellscale.data.baselines import load_or_compute_baselines
    from cellscale.data.store import Dataset

    ds = Dataset.open(shutil.copytree(tiny_dataset_dir, tmp_path / "ds"))
    first = load_or_compute_baselines(ds)
    _truncate(ds.path / "baselines.json")
    capsys.readouterr()
    assert load_or_compute_baselines(ds) == first
    _warning(capsys.readouterr().err, "baselines.json is damaged", "computing the baselines again")
    json.loads((ds.path / "baselines.json").read_text())  # written again, whole
