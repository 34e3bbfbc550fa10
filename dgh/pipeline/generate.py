"""Stage ``generate``: ``python -m dgh.pipeline.generate <set-id>`` writes ``stages/generate/<set-id>/``.

Generated sets (dgh, batch-bns, image-bns) run :func:`dgh.runs.generate.generate_to_dir` (``images.pt``,
``meta.json``, ``preview.png``, ``losses.json``); every set writes ``calib.json`` last (its params-file record), so
a present ``calib.json`` means a complete set. Real and noise sets write only ``calib.json``; ``quantize`` draws
them.

A set with ``processes: K`` (K > 1) relaunches this module under ``torchrun --nproc-per-node K``
(:func:`dgh.generation.distributed.launch`); every process generates its share of the batches and rank 0 writes the
outputs, ``calib.json`` and the MLflow run.
"""

from __future__ import annotations

if __name__ == "__main__":  # run in the warm stage process when there is one (dgh.pipeline.forkserver)
    from dgh.pipeline.forkserver import run_in_server

    run_in_server("dgh.pipeline.generate")

import time
from pathlib import Path

from dgh.generation.distributed import launch, process_rank, world_size_from_env
from dgh.io import write_json
from dgh.layout import META_FILE, PREVIEW_FILE
from dgh.params import REAL
from dgh.pipeline.common import Project, StageError, mlflow_run, stage_main
from dgh.runs.generate import generate_to_dir
from dgh.tracking import TAG_KIND, StepLogger


def run_generate(project: Project, set_id: str) -> Path:
    """Produce calibration set ``set_id``; returns its folder.

    Raises:
        ParamsError: unknown set, missing weights or data folder; generation errors pass through.
    """
    params = project.params
    g = params.generation(set_id)
    out_dir = project.layout.generate_dir(set_id)
    record = {"set_id": set_id, **g.to_json_dict()}
    if g.method == REAL:
        record["data"] = str(params.require(g.data, f"generate.{set_id}.data", "image folder"))
    if not g.is_generated:
        params.model_args(g.model)  # fail early on missing weights
        write_json(record, project.layout.calib_file(set_id))
        return out_dir
    k = g.config.processes
    if k > 1 and world_size_from_env() == 1:
        params_file = project.params_file or project.root / "params.yaml"
        rc = launch(k, "dgh.pipeline.generate", [set_id, "--params", str(params_file)])
        if rc != 0:
            raise StageError(f"generate {set_id}: the {k}-process run failed (exit status {rc}); rank 0's error is above")
        return out_dir
    loaded = project.load_model(g.model)
    if process_rank() != 0:  # another process of a multi-process run: its share only, rank 0 records
        generate_to_dir(loaded, g.config, out_dir, device=params.device, progress=False)
        return out_dir
    tracker = project.tracker()
    tags = {TAG_KIND: "generation", "dgh.model": g.model, "dgh.calib": g.source, "dgh.stage": "generate",
            **({"dgh.ablation": g.ablation} if g.ablation else {})}
    with mlflow_run(tracker, g.model, f"generate/{set_id}", fresh=True, tags=tags,
                    params={"generate": g.config.model_dump(mode="json")}) as run_id:
        logger = StepLogger(tracker, run_id, every=25)
        t0 = time.perf_counter()
        result = generate_to_dir(loaded, g.config, out_dir, device=params.device, progress=params.progress,
                                 on_step=logger)
        logger.flush()
        seconds = time.perf_counter() - t0
        write_json({**record, "seconds": round(seconds, 2)}, project.layout.calib_file(set_id))
        if tracker is not None and run_id is not None:
            tracker.log_metrics(run_id, {"seconds": seconds, **{f"final.{k}": v for k, v in result.loss_terms.items()}})
            for name in (PREVIEW_FILE, META_FILE):
                tracker.log_artifact(run_id, out_dir / name)
    return out_dir


if __name__ == "__main__":
    stage_main(run_generate, "DVC stage generate: one calibration set of params.yaml")
