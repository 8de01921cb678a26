"""The report of a sweep: figures (``plots``, pure), generated text (``methods``) and the writer.

``write_report(sweep_dir) -> (html_path, md_path)`` writes ``report.html`` (self-contained),
``report.md`` with ``figures/*.png``, and ``fit.json`` into the sweep directory.
"""

from cellscale.report.writer import write_report

__all__ = ["write_report"]
