"""A sweep with a learning-rate axis: the report draws loss against LR per size, fits the best
rate's runs only, and flags a choice on the edge of its grid."""

from pathlib import Path

import pandas as pd
from fixtures_report import make_sweep

from cellscale.report import write_report


def test_report_shows_the_lr_search_and_flags_the_edge(tmp_path: Path):
    sweep = make_sweep(tmp_path, sizes=("XXS", "TINY", "XS", "S"), seeds=(0,), diverged=None, failed=None,
                       bootstrap=20)
    runs = pd.read_csv(sweep / "results.csv")
    grid = []
    for m, worse in ((0.5, 1.08), (1.0, 1.0), (2.0, 1.04)):
        part = runs.assign(lr_scale=m, lr=runs["lr"] * m, run_id=runs["run_id"] + f"-lr{m}",
                           best_val_mse=runs["best_val_mse"] * worse, best_val_loss=runs["best_val_mse"] * worse)
        grid.append(part)
    table = pd.concat(grid, ignore_index=True)
    s_best = (table["size"] == "S") & (table["lr_scale"] == 2.0)  # S does best at the grid's top
    table.loc[s_best, ["best_val_mse", "best_val_loss"]] *= 0.9
    table.to_csv(sweep / "results.csv", index=False)
    _, md_path = write_report(sweep)
    md = md_path.read_text()
    assert (sweep / "figures" / "loss_vs_lr.png").stat().st_size > 5_000
    assert "## Learning-rate search" in md
    assert "The best learning rate sits on the edge of its grid for S" in md
    assert "fitted to each size's best learning rate on validation loss (8 runs at other rates left out)" in md
    fit_runs = pd.read_csv(sweep / "results.csv")
    assert len(fit_runs) == 12
