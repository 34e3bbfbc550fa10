"""MLflow tracking: one run per experiment, resumed by every pipeline stage of that experiment.

- Backend: ``sqlite:///<project root>/mlflow.db`` (MLflow's file store is deprecated); ``$MLFLOW_TRACKING_URI``
  overrides it. Artifacts go to ``<project root>/mlartifacts/<mlflow experiment>/`` as plain files
  (``MlflowClient.log_artifact``; never ``mlflow.pytorch.log_model``).
- MLflow experiment = one model (``resnet20_cifar10``, ``yolov5n``), so the compare view lines up runs that share
  metric names (``top1``/``top5`` or ``map``/``map50``) and tags (``dgh.calib``, ``dgh.setting`` ...).
- Run = one pipeline experiment (``resnet20_cifar10-dgh-w8a8-pot-mse``), found again by the tag ``dgh.run_key``.
  The stage that starts an experiment (``quantize``) opens a fresh run; later stages (``evaluate_*``) resume the
  newest run with that key. Float baselines are their own runs (``<model>-float``), generation runs are
  ``generate/<set-id>`` with the loss terms per iteration as step metrics.

The client object is passed around explicitly (no module-level state), so tests can point it at a temporary db.

Concurrency (``dvc exp run --jobs N``, ``dvc queue``): opening a sqlite store creates or migrates its schema, which
is not safe from several processes at once; it runs under a file lock ``<db>.lock`` (filelock), as does creating an
MLflow experiment. Writes that meet sqlite's "database is locked" are retried for a few seconds.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from filelock import FileLock, Timeout


TAG_KEY = "dgh.run_key"
TAG_KIND = "dgh.kind"  # experiment | float | generation
MAX_BATCH = 900  # MLflow log_batch accepts at most 1000 metrics per call


STORE_LOCK_TIMEOUT_S = 300.0  # creating/migrating a fresh store takes seconds; a stale lock file is never held
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 4.0)  # sqlite "database is locked" retries (about 8 s in all)


class TrackingError(ValueError):
    """The tracking store could not be opened or written. One line."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI, or None for other stores (and in-memory sqlite)."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or not parsed.path or parsed.path in ("/", "/:memory:"):
        return None
    return Path(unquote(parsed.path))


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the inter-process lock ``<db>.lock`` of a sqlite store (no-op for other stores).

    Raises:
        TrackingError: the lock was not obtained within :data:`STORE_LOCK_TIMEOUT_S`.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(db) + ".lock", timeout=STORE_LOCK_TIMEOUT_S)
    try:
        with lock:
            yield
    except Timeout:
        raise TrackingError(f"another process has held {lock.lock_file} for {STORE_LOCK_TIMEOUT_S:.0f} s; "
                            "is a stage stuck?") from None


def _is_lock_contention(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


def with_retry(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, retried after :data:`RETRY_DELAYS_S` pauses while sqlite reports lock contention."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if delay is None or not _is_lock_contention(exc):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


class _RetryingClient:
    """An :class:`mlflow.tracking.MlflowClient` whose method calls go through :func:`with_retry`."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: with_retry(attr, *args, **kwargs)


def default_tracking_uri(project_root: str | os.PathLike) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project_root>/mlflow.db`` (absolute path)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(project_root).resolve() / 'mlflow.db'}"


def git_commit(project_root: str | os.PathLike) -> str:
    """The git HEAD commit of ``project_root`` (with ``-dirty`` when the work tree differs), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> ``{"a.b.c": "value"}`` with string values (MLflow params are strings, max 6000 chars)."""
    flat: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            v = getattr(value, "value", value)  # enums
            flat[name] = str(v)[:6000]
    return flat


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Keep the numeric, finite entries of ``metrics`` as floats (bools and strings dropped)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


@dataclass
class Tracker:
    """A thin wrapper around :class:`mlflow.tracking.MlflowClient` for the pipeline's run layout.

    Attributes:
        uri: the tracking URI (``sqlite:///.../mlflow.db``).
        artifact_root: folder under which each MLflow experiment stores its artifacts.
        commit: git commit recorded as the ``dgh.git_commit`` tag.
    """

    uri: str
    artifact_root: Path
    commit: str = "unknown"

    def __post_init__(self) -> None:
        from mlflow.tracking import (
            MlflowClient,  # slow import; only when tracking is used
        )

        try:
            with store_lock(self.uri):  # opening a sqlite store creates or migrates its tables
                client = MlflowClient(tracking_uri=self.uri)
                client.search_experiments(max_results=1)  # make sure the store is built now, inside the lock
        except TrackingError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TrackingError(f"cannot open MLflow store {self.uri}: {str(exc).splitlines()[0][:200]}") from None
        self.client = _RetryingClient(client)

    @classmethod
    def for_project(cls, project_root: str | os.PathLike) -> Tracker:
        """The tracker of a project folder: sqlite db and ``mlartifacts/`` inside it, commit from its git."""
        root = Path(project_root).resolve()
        return cls(uri=default_tracking_uri(root), artifact_root=root / "mlartifacts", commit=git_commit(root))

    # -------------------------------------------------------------------------------------------- runs
    def experiment_id(self, name: str) -> str:
        """Id of the MLflow experiment ``name``, created (artifacts under ``artifact_root/name``) if absent.

        Creation runs under the store lock, so two stages that start together create it once.
        """
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        with store_lock(self.uri):
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            location = (self.artifact_root / name).resolve().as_uri()
            # MLflow 3's UI opens experiments without this tag in its GenAI view (traces), not the runs/compare view
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})

    def find_run(self, experiment: str, run_key: str) -> str | None:
        """The newest run of ``experiment`` tagged ``dgh.run_key = run_key``, or None."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = self.client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{TAG_KEY}` = '{run_key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def start_run(
        self,
        experiment: str,
        run_key: str,
        *,
        fresh: bool,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> str:
        """Open the run ``run_key`` of MLflow experiment ``experiment`` and return its id.

        Args:
            experiment: MLflow experiment name (the model).
            run_key: the pipeline id; also the run name.
            fresh: True starts a new run (the first stage of an experiment); False resumes the newest run with
                that key, or starts one if there is none.
            tags: string tags to set (``dgh.*``).
            params: nested dict logged as flattened params (only on a new run: MLflow params are immutable).
        """
        run_id = None if fresh else self.find_run(experiment, run_key)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id(experiment),
                run_name=run_key,
                tags={TAG_KEY: run_key, "dgh.git_commit": self.commit},
            )
            run_id = run.info.run_id
            if params:
                self.log_params(run_id, params)
        else:
            self.client.update_run(run_id, status="RUNNING")
        if tags:
            self.set_tags(run_id, tags)
        return run_id

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set string tags (``None`` values skipped)."""
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(getattr(v, "value", v))) for k, v in tags.items() if v is not None]
        if batch:
            self.client.log_batch(run_id, tags=batch)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log a nested dict as flattened string params (in batches of at most 90)."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i : i + 90])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log the finite numeric entries of ``metrics`` at ``step``."""
        self.log_history(run_id, [(step, finite_metrics(metrics))])

    def log_history(self, run_id: str, history: Iterable[tuple[int, Mapping[str, float]]], prefix: str = "") -> int:
        """Log step metrics ``[(step, {name: value})...]`` with :meth:`MlflowClient.log_batch`; returns the count."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch: list[Any] = []
        count = 0
        for step, metrics in history:
            for k, v in finite_metrics(metrics).items():
                batch.append(Metric(prefix + k, v, now, int(step)))
                if len(batch) >= MAX_BATCH:
                    self.client.log_batch(run_id, metrics=batch)
                    count += len(batch)
                    batch = []
        if batch:
            self.client.log_batch(run_id, metrics=batch)
            count += len(batch)
        return count

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy one local file into the run's artifacts (skipped silently when the file does not exist)."""
        if Path(path).is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark the run terminated (``FINISHED`` or ``FAILED``)."""
        self.client.set_terminated(run_id, status)


class StepLogger:
    """Buffer per-iteration metrics from a generation callback and flush them to MLflow every ``every`` steps.

    ``logger(iteration, {"loss": ..., "bn": ...})`` appends to :attr:`history` (kept for ``losses.json``) and
    logs to the run in batches, so a 1000-iteration run makes ~``1000/every`` sqlite writes instead of thousands.
    """

    def __init__(self, tracker: Tracker | None, run_id: str | None, every: int = 25, prefix: str = "") -> None:
        self.tracker, self.run_id, self.every, self.prefix = tracker, run_id, max(1, every), prefix
        self.history: list[tuple[int, dict[str, float]]] = []
        self._pending: list[tuple[int, dict[str, float]]] = []

    def __call__(self, iteration: int, metrics: Mapping[str, float]) -> None:
        row = (int(iteration), finite_metrics(metrics))
        self.history.append(row)
        self._pending.append(row)
        if len(self._pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        """Send the buffered steps."""
        if self.tracker is not None and self.run_id is not None and self._pending:
            self.tracker.log_history(self.run_id, self._pending, prefix=self.prefix)
        self._pending = []
