"""Stage ``export``: ``python -m dgh.pipeline.export <exp-id>`` writes ``stages/export/<exp-id>/model.onnx`` (the
quantized model as ONNX QuantizeLinear/DequantizeLinear, :func:`dgh.export.export_to_dir`) and ``export.json`` (size,
QDQ counts, the onnxruntime agreement in quantization steps), and logs both to the experiment's MLflow run with the
size and the agreement as metrics. With ``export.enabled: false`` in ``params.yaml`` it writes only ``export.json``
(``{"enabled": false}``)."""

from __future__ import annotations

if __name__ == "__main__":  # run in the warm stage process when there is one (dgh.pipeline.forkserver)
    from dgh.pipeline.forkserver import run_in_server

    run_in_server("dgh.pipeline.export")

from pathlib import Path

from dgh.export import EXPORT_RECORD_FILE, EXPORT_STAGE, ONNX_FILE, export_to_dir
from dgh.io import write_json
from dgh.pipeline.common import Project, StageError, experiment_tags, mlflow_run, stage_main
from dgh.pipeline.quantize import load_calibration


def export_dir(project: Project, experiment_id: str) -> Path:
    """``stages/export/<exp-id>``."""
    return project.layout.stage_dir(EXPORT_STAGE, experiment_id)


def onnx_file(project: Project, experiment_id: str) -> Path:
    """``stages/export/<exp-id>/model.onnx``."""
    return export_dir(project, experiment_id) / ONNX_FILE


def run_export(project: Project, experiment_id: str) -> Path:
    """Export experiment ``experiment_id``; returns its folder.

    Raises:
        StageError: the quantize stage has not run. ExportError / AgreementError: see :mod:`dgh.export`.
    """
    params, layout = project.params, project.layout
    e = params.experiment(experiment_id)
    out = export_dir(project, experiment_id)
    record = {"experiment": experiment_id, "model": e.model, "setting": e.setting, "enabled": params.export.enabled}
    if not params.export.enabled:
        write_json(record, out / EXPORT_RECORD_FILE)
        return out
    qpath = layout.quantized_file(experiment_id)
    if not qpath.is_file():
        raise StageError(f"{qpath} not found; run `dvc repro` for the quantize stage of {experiment_id}")
    loaded = project.load_model(e.model)
    sample = load_calibration(project, e.calib, loaded)[: params.export.sample_images]
    tracker = project.tracker()
    with mlflow_run(tracker, e.model, experiment_id, fresh=False,
                    tags=experiment_tags(params, experiment_id, EXPORT_STAGE)) as run_id:
        summary = export_to_dir(loaded, qpath, out, sample_nchw=sample, opset=params.export.opset, record=record)
        if tracker is not None and run_id is not None:
            agreement = summary["agreement"]
            tracker.log_metrics(run_id, {
                "onnx_size_bytes": summary["size_bytes"],
                "onnx_max_output_steps": agreement["max_output_steps"],
                "onnx_max_local_steps": agreement["max_local_steps"],
                "onnx_frac_output_differing": agreement["frac_output_differing"],
                "onnx_max_local_fraction": agreement["max_local_fraction"],
                **({"onnx_reference_output_steps": agreement["reference_output_steps"]}
                   if agreement["reference_output_steps"] is not None else {}),
            })
            for name in (ONNX_FILE, EXPORT_RECORD_FILE):
                tracker.log_artifact(run_id, out / name, EXPORT_STAGE)
    return out


if __name__ == "__main__":
    stage_main(run_export, "DVC stage export: one experiment of params.yaml to ONNX (QDQ)")
