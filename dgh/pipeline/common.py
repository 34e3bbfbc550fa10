"""What every DVC stage shares: loading ``params.yaml``, the project root, MLflow runs, the stage entry point."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

from dgh.env import configure_offline
from dgh.layout import StageLayout
from dgh.models import LoadedModel, load_model
from dgh.params import Params, load_params
from dgh.threads import apply_threads
from dgh.tracking import TAG_KIND, Tracker


class StageError(ValueError):
    """A pipeline stage cannot run (missing upstream output, bad id). One line."""


@dataclass(frozen=True)
class Project:
    """A loaded ``params.yaml`` and the project it belongs to (the folder holding it)."""

    params: Params
    root: Path
    track: bool = True
    params_file: Path | None = None  # the file it was read from (a multi-process stage relaunches with it)

    @property
    def layout(self) -> StageLayout:
        """Where the stage outputs go."""
        return StageLayout(self.root)

    def tracker(self) -> Tracker | None:
        """The MLflow tracker, or ``None`` when tracking is off (``track=False`` or ``$DGH_TRACKING`` = 0/false/off)."""
        if not self.track or os.environ.get("DGH_TRACKING", "1").lower() in ("0", "false", "no", "off"):
            return None
        return Tracker.for_project(self.root)

    def load_model(self, key: str) -> LoadedModel:
        """Load model ``key`` of ``params.yaml`` (weights must exist)."""
        name, weights, imgsz = self.params.model_args(key)
        return load_model(name, weights, imgsz)


def open_project(params_path: str | os.PathLike = "params.yaml", *, track: bool = True) -> Project:
    """Load and validate ``params_path`` and apply its ``threads``; the project root is its folder.

    Raises:
        ParamsError: invalid params (one line).
    """
    params = load_params(params_path)
    apply_threads(params.threads)
    root = Path(params_path).resolve().parent
    ensure_ultralytics_font(root)
    return Project(params, root, track, Path(params_path).resolve())


def ensure_ultralytics_font(root: Path) -> None:
    """Point ``YOLO_CONFIG_DIR`` (if unset) at ``<root>/.cache/ultralytics`` and put a local ``Arial.ttf`` there.

    Ultralytics looks for Arial.ttf in its config folder whenever it plots or validates and downloads it when missing;
    with no network that fails. matplotlib's DejaVuSans serves as the fallback (same as ``run.sh`` does).
    """
    cfg = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(root / ".cache" / "ultralytics")))
    try:
        cfg.mkdir(parents=True, exist_ok=True)
        if not (cfg / "Arial.ttf").is_file():
            font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
            for name in ("Arial.ttf", "Arial.Unicode.ttf"):
                shutil.copyfile(font, cfg / name)
    except OSError:
        pass  # a read-only location: ultralytics then only warns


@contextmanager
def mlflow_run(tracker: Tracker | None, experiment: str, key: str, *, fresh: bool, tags: dict,
               params: dict | None = None) -> Iterator[str | None]:
    """Open (or resume) a run; mark it FAILED when the body raises, FINISHED otherwise. Yields the run id or None."""
    if tracker is None:
        yield None
        return
    run_id = tracker.start_run(experiment, key, fresh=fresh, tags=tags, params=params)
    try:
        yield run_id
    except BaseException:
        tracker.finish(run_id, "FAILED")
        raise
    tracker.finish(run_id, "FINISHED")


def experiment_tags(params: Params, experiment_id: str, stage: str) -> dict[str, str]:
    """The MLflow tags of an experiment run (what the compare view groups by)."""
    e = params.experiment(experiment_id)
    ablation = params.generation(e.calib).ablation
    return {
        **({"dgh.ablation": ablation} if ablation else {}),
        TAG_KIND: "experiment",
        "dgh.task": params.task_of(experiment_id),
        "dgh.model": e.model,
        "dgh.calib": params.generation(e.calib).source,
        "dgh.calib_set": e.calib,
        "dgh.preset": e.preset.value,
        "dgh.bits": f"W{e.w_bits}A{e.a_bits}",
        "dgh.algorithm": e.algorithm.value,
        "dgh.setting": e.setting,
        "dgh.stage": stage,
    }


def stage_main(run: Callable[[Project, str], Path], description: str, argv: list[str] | None = None) -> None:
    """Command-line entry of one stage module: ``python -m dgh.pipeline.<stage> ID [--params PATH]``.

    A ``ValueError`` ends it with ``error: <one line>`` on stderr and exit status 2.
    """
    configure_offline()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("item", nargs="?", default="", help="calibration-set id, experiment id or model key")
    parser.add_argument("--params", default="params.yaml", help="the params file (its folder is the project root)")
    args = parser.parse_args(argv)
    try:
        out = run(open_project(args.params), args.item)
    except ValueError as exc:
        print(f"error: {' '.join(str(exc).split())[:500]}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}")
