"""The report of a sweep.

``write_report(sweep_dir) -> (html_path, md_path)`` writes ``report.html`` (self-contained),
``report.md`` with ``figures/*.png``, and ``fit.json`` into the sweep directory. Its rooms, in
the order it runs them: ``load`` (the sweep into ``SweepData``), ``fitting`` (``run_fit``,
``FitOutcome``), ``figures`` (over ``plots``), ``tables``, ``sections`` (the one list of
sections, with ``methods`` for the generated paragraphs) and ``render`` (HTML and Markdown).
"""

from cellscale.report.fitting import FitOutcome, run_fit
from cellscale.report.load import load_sweep
from cellscale.report.records import SweepData
from cellscale.report.writer import write_report

__all__ = ["write_report", "load_sweep", "run_fit", "SweepData", "FitOutcome"]
