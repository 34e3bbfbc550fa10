"""Stage ``inputs``: fingerprints of every weights file and data folder that ``params.yaml`` names.

``python -m dgh.pipeline.inputs`` writes one small JSON file per consumer under ``stages/inputs/``: a SHA-256 over
the relative names, sizes and bytes of the files (not over where they are, so moving the assets re-runs nothing)::

    stages/inputs/model/<model>.json           the weights file of models.<model>
    stages/inputs/calib/<set-id>.json          the data folder of a real calibration set (others: no files)
    stages/inputs/imagenet/<model>.json        imagenet.eval.<model>.data
    stages/inputs/coco/<model>.json            coco.eval.<model>.images + labels / annotations

The stage is ``always_changed`` in ``dvc.yaml``, so every ``dvc repro`` re-hashes the inputs (a few seconds for the
default assets); each file is rewritten only when its content changes, and the stages that read an input list its
fingerprint as a dep. So a replaced checkpoint or an edited image folder re-runs exactly the stages that read it.
Paths cannot be DVC deps directly: they are relative to ``assets`` (overridable by ``$DGH_ASSETS``) or absolute,
and a foreach stage cannot look up ``models.<item.model>.weights`` in ``dvc.yaml``.
"""

from __future__ import annotations

if __name__ == "__main__":  # run in the warm stage process when there is one (dgh.pipeline.forkserver)
    from dgh.pipeline.forkserver import run_in_server

    run_in_server("dgh.pipeline.inputs")

import hashlib
import json
from pathlib import Path

from dgh.io import write_json
from dgh.pipeline.common import Project, stage_main

INPUTS_DIR = "inputs"
CHUNK = 1 << 20


def fingerprint(paths: list[Path]) -> str:
    """SHA-256 hex digest over every file under ``paths`` (a file or a folder, recursively, sorted by name): each
    file's path relative to its root, size and bytes. A missing path hashes as ``missing:<path>``."""
    h = hashlib.sha256()
    for root in paths:
        h.update(f"root:{root.name}\n".encode())
        if not root.exists():
            h.update(f"missing:{root}\n".encode())
            continue
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            rel = f.name if f == root else f.relative_to(root).as_posix()
            h.update(f"{rel}\0{f.stat().st_size}\n".encode())
            with f.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
    return h.hexdigest()


def _write_if_changed(record: dict, path: Path) -> None:
    text = json.dumps(record, indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_json(record, path)


def input_records(project: Project) -> dict[str, dict]:
    """``{"model/<key>": {"input": "model/<key>", "sha256": ...}, ...}`` for every input of ``params.yaml``."""
    params = project.params
    groups: dict[str, list[Path]] = {}
    for key, m in params.models.items():
        groups[f"model/{key}"] = [params.resolve(m.weights)] if m.weights else []
    for sid, g in params.generate.items():
        groups[f"calib/{sid}"] = [params.resolve(g.data)] if g.data else []
    for key, d in params.imagenet.eval.items():
        groups[f"imagenet/{key}"] = [params.resolve(d.data)]
    for key, c in params.coco.eval.items():
        groups[f"coco/{key}"] = [params.resolve(p) for p in (c.images, c.labels, c.annotations) if p]
    return {name: {"input": name, "sha256": fingerprint(paths)} for name, paths in groups.items()}


def run_inputs(project: Project, item: str = "") -> Path:
    """Write the fingerprints (unchanged files are not touched); returns ``stages/inputs``."""
    for name, record in input_records(project).items():
        kind, key = name.split("/", 1)
        _write_if_changed(record, project.layout.input_file(kind, key))
    return project.layout.stage_dir(INPUTS_DIR, "")


if __name__ == "__main__":
    stage_main(run_inputs, "DVC stage inputs: fingerprints of the weights files and data folders of params.yaml")
