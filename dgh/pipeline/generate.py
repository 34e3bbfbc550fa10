"""Stage ``generate``: ``python -m dgh.pipeline.generate <set-id>`` writes ``stages/generate/<set-id>/``.

Generated sets (dgh, batch-bns, image-bns) run :func:`dgh.runs.generate.generate_to_dir` (``images.pt``,
``meta.json``, ``preview.png``, ``losses.json``); every set writes ``calib.json`` last (its params-file record), so
a present ``calib.json`` means a complete set. Real and noise sets write only ``calib.json``; ``quantize`` draws
them.
"""

from __future__ import annotations

import time
from pathlib import Path

from dgh.io import write_json
from dgh.layout import META_FILE, PREVIEW_FILE
from dgh.params import REAL
from dgh.pipeline.common import Project, mlflow_run, stage_main
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
    loaded = project.load_model(g.model)
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
