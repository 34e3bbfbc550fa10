"""Generate a calibration set into a folder (used by ``dgh generate`` and the DVC stage ``generate``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from dgh.generation import GenerationConfig, GenerationResult, generate_images
from dgh.generation.distributed import process_rank
from dgh.io import write_json
from dgh.layout import LOSSES_FILE
from dgh.models import LoadedModel

StepCallback = Callable[[int, Mapping[str, float]], None]


def generate_to_dir(
    loaded: LoadedModel,
    config: GenerationConfig,
    out_dir: str | Path,
    *,
    device: str | None = None,
    progress: bool = True,
    resume: bool = False,
    on_step: StepCallback | None = None,
) -> GenerationResult:
    """Run :func:`dgh.generation.generate_images` and write its outputs into ``out_dir``.

    Writes ``images.pt`` (float32 ``(N, 3, H, W)``, normalized space; :func:`dgh.io.save_images`), ``meta.json``,
    ``preview.png`` and ``losses.json`` (``[{"iteration": i, "loss", "bn", "out", "lr"}, ...]``, one row per
    iteration). Same ``loaded`` weights, ``config`` and device give bit-identical ``images.pt``.

    Args:
        on_step: also called as ``on_step(iteration, metrics)`` after every iteration (e.g. MLflow logging).

    The set's statistics are separate (:func:`dgh.runs.stats.stats_to_dir`; ``dgh generate`` writes them next to
    the images, the pipeline in the stage ``set_stats``), so that editing them never re-runs a generation.

    In a multi-process run (torchrun; :mod:`dgh.generation.distributed`) every process calls this; rank 0 writes
    the outputs and calls ``on_step``, the others return their (image-less) result.

    Raises:
        the errors of :func:`dgh.generation.generate_images` (all ``ValueError``).
    """
    out = Path(out_dir)
    history: list[dict[str, float]] = []
    main = process_rank() == 0

    def record(iteration: int, metrics: Mapping[str, float]) -> None:
        history.append({"iteration": int(iteration), **{k: float(v) for k, v in metrics.items()}})
        if on_step is not None and main:
            on_step(iteration, metrics)

    result = generate_images(loaded, config, out_dir=out, resume=resume, callback=record, device=device,
                             progress=progress)
    if not main:
        return result
    write_json(history, out / LOSSES_FILE)
    return result
