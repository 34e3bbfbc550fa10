"""Stage ``report``: ``python -m dgh.pipeline.report`` writes ``reports/`` (see :mod:`dgh.report`)."""

from __future__ import annotations

if __name__ == "__main__":  # run in the warm stage process when there is one (dgh.pipeline.forkserver)
    from dgh.pipeline.forkserver import run_in_server

    run_in_server("dgh.pipeline.report")

from pathlib import Path

from dgh.pipeline.common import Project, stage_main
from dgh.report import write_report


def run_report(project: Project, item: str = "") -> Path:
    """Tables, plot and image grid under ``params.report.out_dir``; returns the path of ``results.md``."""
    return write_report(project.params, project.root)


if __name__ == "__main__":
    stage_main(run_report, "DVC stage report: reports/results.md and figures from the stage metrics")
