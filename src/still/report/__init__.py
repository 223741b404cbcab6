"""still.report: PNG plots and the HTML report of a run directory (`still report RUN_DIR`)."""

from still.report.html import write_report
from still.report.plots import find_logs, make_plots

__all__ = ["write_report", "make_plots", "find_logs"]
