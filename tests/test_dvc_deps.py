"""The code deps of every DVC stage in dvc.yaml are exactly the dgh modules its command executes (import graph).

A stage's command is ``python -m <module> ...``; the modules it runs are the transitive closure of ``<module>`` in
the import graph of ``dgh`` (:mod:`tests.import_graph`, read with ``ast``). A dep that is a folder stands for every
``.py`` file under it. A missing dep means DVC would not re-run the stage after an edit to that module; an extra one
means it re-runs for nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.import_graph import REPO, closure_files, cycles

CMD = re.compile(r"python -m (dgh(?:\.\w+)+)")


def stage_code_deps(dvc: dict, repo: Path = REPO) -> dict[str, tuple[str, set[str]]]:
    """``{stage name: (entry module, the .py files its dgh deps stand for)}`` for every stage of ``dvc.yaml``."""
    out = {}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        match = CMD.search(body["cmd"])
        assert match, f"stage {name}: command {body['cmd']!r} is not `python -m dgh....`"
        files: set[str] = set()
        for dep in body.get("deps", []):
            if not dep.startswith("dgh"):
                continue
            path = repo / dep
            assert path.exists(), f"stage {name}: dep {dep} does not exist"
            found = [path] if path.is_file() else sorted(path.rglob("*.py"))
            files |= {p.relative_to(repo).as_posix() for p in found}
        out[name] = (match.group(1), files)
    return out


def drift(dvc: dict) -> dict[str, dict[str, list[str]]]:
    """Per stage, the modules it imports but does not list (``missing``) and listed ones it never runs (``extra``)."""
    problems = {}
    for name, (module, listed) in stage_code_deps(dvc).items():
        imported = closure_files(module)
        if imported != listed:
            problems[name] = {"missing": sorted(imported - listed), "extra": sorted(listed - imported)}
    return problems


def load_dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_lists_exactly_the_modules_it_imports() -> None:
    dvc = load_dvc()
    assert len(dvc["stages"]) >= 8
    assert drift(dvc) == {}


@pytest.mark.parametrize("dep", ["dgh/io.py", "dgh/generation", "dgh/runs/generate.py"])
def test_removing_a_dep_is_detected(dep: str) -> None:
    dvc = load_dvc()
    deps = dvc["stages"]["generate"]["do"]["deps"]
    assert dep in deps
    deps.remove(dep)
    problems = drift(dvc)
    assert set(problems) == {"generate"}
    assert problems["generate"]["extra"] == []
    removed = {dep} if dep.endswith(".py") else {p.relative_to(REPO).as_posix() for p in (REPO / dep).rglob("*.py")}
    assert set(problems["generate"]["missing"]) == removed


def test_an_unused_dep_is_detected() -> None:
    dvc = load_dvc()
    dvc["stages"]["generate"]["do"]["deps"].append("dgh/evaluation")
    assert drift(dvc)["generate"]["extra"] == sorted(
        p.relative_to(REPO).as_posix() for p in (REPO / "dgh/evaluation").rglob("*.py"))


def test_stages_import_only_what_they_run() -> None:
    """Generation does not run evaluation code, and no stage but report imports the report module."""
    assert not any(f.startswith("dgh/evaluation") for f in closure_files("dgh.pipeline.generate"))
    assert not any(f.startswith("dgh/evaluation") for f in closure_files("dgh.pipeline.quantize"))
    for stage in ("generate", "quantize", "evaluate", "inputs"):
        assert "dgh/report.py" not in closure_files(f"dgh.pipeline.{stage}")
        assert "dgh/cli.py" not in closure_files(f"dgh.pipeline.{stage}")


def test_no_import_cycles() -> None:
    assert cycles() == []
