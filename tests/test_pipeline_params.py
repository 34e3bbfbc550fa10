"""params.yaml schema (dgh/params.py) and its consistency with dvc.yaml."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dgh.params import ParamsError, check_paths, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def minimal() -> dict:
    return {
        "assets": "assets",
        "models": {"resnet20_cifar10": {"weights": "w.th"}},
        "generate": {
            "r20-dgh": {"model": "resnet20_cifar10", "method": "dgh", "n_images": 8, "iterations": 2},
            "r20-real": {"model": "resnet20_cifar10", "method": "real", "data": "train", "n_images": 8},
        },
        "imagenet": {
            "eval": {"resnet20_cifar10": {"data": "test"}},
            "experiments": {
                "e1": {"model": "resnet20_cifar10", "calib": "r20-dgh", "preset": "pot", "w_bits": 4, "a_bits": 8},
            },
        },
    }


def test_repo_params_yaml_is_valid_and_consistent():
    params = load_params(REPO / "params.yaml")
    assert params.experiment_ids(), "the default params.yaml defines experiments"
    for eid in params.experiment_ids():
        e = params.experiment(eid)
        assert params.generate[e.calib].model == e.model


def test_unknown_key_is_named(tmp_path):
    data = minimal()
    data["generate"]["r20-dgh"]["iter"] = 5  # typo of iterations
    with pytest.raises(ParamsError) as exc:
        parse_params(data, tmp_path)
    msg = str(exc.value)
    assert "generate.r20-dgh.config.iter" in msg and "unknown key" in msg and "\n" not in msg


def test_wrong_type_is_named(tmp_path):
    data = minimal()
    data["generate"]["r20-dgh"]["iterations"] = "many"
    with pytest.raises(ParamsError, match=r"generate\.r20-dgh\.config\.iterations"):
        parse_params(data, tmp_path)


def test_top_level_unknown_key(tmp_path):
    data = minimal()
    data["experiment"] = {}
    with pytest.raises(ParamsError, match="unknown key `experiment`"):
        parse_params(data, tmp_path)


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda d: d["imagenet"]["experiments"]["e1"].update(calib="nope"), "imagenet.experiments.e1.calib"),
        (lambda d: d["imagenet"]["experiments"]["e1"].update(model="yolov5n"), "imagenet.experiments.e1.model"),
        (lambda d: d["generate"]["r20-dgh"].update(model="nope"), "generate.r20-dgh.model"),
        (lambda d: d["generate"]["r20-real"].pop("data"), "generate.r20-real"),
    ],
)
def test_dangling_references_are_named(tmp_path, mutate, key):
    data = copy.deepcopy(minimal())
    mutate(data)
    with pytest.raises(ParamsError) as exc:
        parse_params(data, tmp_path)
    assert key in str(exc.value)


def test_missing_paths_name_path_and_remedy(tmp_path, monkeypatch):
    monkeypatch.delenv("DGH_ASSETS", raising=False)
    params = parse_params(minimal(), tmp_path)
    assert params.assets_root == (tmp_path / "assets").resolve()
    problems = check_paths(params)
    assert len(problems) == 3  # weights, real data, eval data
    weights_msg = next(p for p in problems if "models.resnet20_cifar10.weights" in p)
    assert str(tmp_path / "assets" / "w.th") in weights_msg and "DGH_ASSETS" in weights_msg
    with pytest.raises(ParamsError, match="weights file not found"):
        params.model_args("resnet20_cifar10")


def test_assets_env_overrides_and_absolute_paths(tmp_path, monkeypatch):
    root = tmp_path / "elsewhere"
    (root / "test").mkdir(parents=True)
    (root / "train").mkdir()
    (root / "w.th").write_bytes(b"x")
    monkeypatch.setenv("DGH_ASSETS", str(root))
    params = parse_params(minimal(), tmp_path)
    assert params.assets_root == root.resolve()
    assert check_paths(params) == []
    assert params.model_args("resnet20_cifar10") == ("resnet20_cifar10", str(root / "w.th"), None)
    assert params.resolve("/abs/x") == Path("/abs/x")


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_dvc_yaml_matches_params():
    """Every foreach of dvc.yaml iterates a params.yaml section, and every params entry is a stage."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = load_params(REPO / "params.yaml")
    expected = {
        "generate": ("${generate}", set(params.generate)),
        "quantize_imagenet": ("${imagenet.experiments}", set(params.imagenet.experiments)),
        "quantize_coco": ("${coco.experiments}", set(params.coco.experiments)),
        "export_imagenet": ("${imagenet.experiments}", set(params.imagenet.experiments)),
        "export_coco": ("${coco.experiments}", set(params.coco.experiments)),
        "evaluate_imagenet": ("${imagenet.experiments}", set(params.imagenet.experiments)),
        "evaluate_coco": ("${coco.experiments}", set(params.coco.experiments)),
        "evaluate_imagenet_float": ("${imagenet.eval}", set(params.imagenet.eval)),
        "evaluate_coco_float": ("${coco.eval}", set(params.coco.eval)),
        "set_stats": ("${generate}", set(params.generate)),
        "quant_stats_imagenet": ("${imagenet.experiments}", set(params.imagenet.experiments)),
        "quant_stats_coco": ("${coco.experiments}", set(params.coco.experiments)),
        "stats": ("${models}", set(params.models)),
    }
    assert set(dvc) == set(expected) | {"inputs", "report"}
    for name, (foreach, _) in expected.items():
        assert dvc[name]["foreach"] == foreach, name
        module = {"set_stats": "set_stats", "quant_stats_imagenet": "quant_stats",
                  "quant_stats_coco": "quant_stats"}.get(name, name.split("_")[0])
        item = f"{name.split('_')[1]}:${{key}}" if name.endswith("_float") else "${key}"
        assert dvc[name]["do"]["cmd"] == f"python -m dgh.pipeline.{module} {item}"
    # generated sets are shared: quantize depends on the calibration set's folder, not on a copy
    assert "stages/generate/${item.calib}" in dvc["quantize_imagenet"]["do"]["deps"]
    assert "generate.${key}" in dvc["generate"]["do"]["params"]


def test_paper_scale_params_validate(monkeypatch):
    """params.paper.yaml (the documented paper-scale configuration) passes the schema; its paths are the user's."""
    monkeypatch.delenv("DGH_ASSETS", raising=False)
    params = load_params(REPO / "params.paper.yaml")
    by_id = {eid: params.experiment(eid) for eid in params.experiment_ids()}
    assert {(e.preset.value, e.w_bits, e.a_bits, e.algorithm.value) for e in by_id.values()} >= {
        ("paper", 4, 4, "brecq"), ("pot", 8, 8, "mse"), ("pot", 4, 8, "mse")}
    dgh_sets = [g for g in params.generate.values() if g.source == "dgh"]
    assert all((g.config.n_images, g.config.iterations) == (1024, 1000) for g in dgh_sets)


def test_export_params_defaults_and_backend_check(tmp_path):
    params = parse_params(minimal(), tmp_path)
    assert params.export.enabled and params.export.evaluate_backend == "pytorch" and params.export.opset == 17
    with pytest.raises(ParamsError, match="export.evaluate_backend"):
        parse_params({**minimal(), "export": {"enabled": False, "evaluate_backend": "onnxruntime"}}, tmp_path)
    with pytest.raises(ParamsError, match="export.opset"):
        parse_params({**minimal(), "export": {"opset": 11}}, tmp_path)
