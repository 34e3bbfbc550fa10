"""The ablation table, the fix detection from generation configs and the claim sentences (known answers)."""

from __future__ import annotations

import pytest

from dgh.generation import GenerationConfig
from dgh.params import ParamsError, parse_params
from dgh.report_ablation import AblationRow, ablation_claim, ablation_markdown, detection_claim, fix_effects, fixes_of

PIPE_OFF = dict(canvas_pad=0, flip=False, smoothing=False, random_crop=False, clamp=False)


def test_fixes_of_the_presets_and_the_ablation_settings():
    assert fixes_of(GenerationConfig.for_method("dgh")) == {"global": True, "pipeline": True, "odsl": True}
    assert fixes_of(GenerationConfig.for_method("batch-bns")) == {"global": False, "pipeline": False, "odsl": False}
    assert fixes_of(GenerationConfig.for_method("image-bns")) == {"global": False, "pipeline": False, "odsl": False}
    assert fixes_of(GenerationConfig.for_method("batch-bns", statistics="all")) == {
        "global": True, "pipeline": False, "odsl": False}
    assert fixes_of(GenerationConfig.for_method("dgh", **PIPE_OFF)) == {"global": True, "pipeline": False, "odsl": True}
    assert fixes_of(GenerationConfig.for_method("dgh", output_loss_weight=0.0))["odsl"] is False
    assert fixes_of(GenerationConfig.for_method("dgh", output_loss="none"))["odsl"] is False


def _rows(values: dict[tuple[bool, bool, bool], float]) -> list[AblationRow]:
    return [AblationRow(f"r{i}", dict(zip(("global", "pipeline", "odsl"), k)), {"W4A8": v})
            for i, (k, v) in enumerate(values.items())]


LADDER = {(False, False, False): 70.0, (True, False, False): 71.5, (True, True, False): 74.0, (True, True, True): 75.0,
          (False, True, True): 73.0, (True, False, True): 72.0}


def test_fix_effects_known_answer():
    eff = fix_effects(_rows(LADDER), "W4A8")
    assert eff["added"] == pytest.approx({"global": 1.5, "pipeline": 2.5, "odsl": 1.0})
    assert eff["removed"] == pytest.approx({"global": 2.0, "pipeline": 3.0, "odsl": 1.0})
    assert eff["total"] == pytest.approx(5.0)


def test_ablation_claim_verdicts():
    assert "supported (every fix" in ablation_claim(_rows(LADDER), "W4A8", 2, "top-1 %")
    worse = {**LADDER, (True, False, False): 69.0}  # all-images statistics hurts when added alone
    assert "partly supported" in ablation_claim(_rows(worse), "W4A8", 2, "top-1 %")
    assert "not supported" in ablation_claim(_rows({**LADDER, (True, True, True): 69.0}), "W4A8", 2, "top-1 %")
    assert ablation_claim(_rows({(True, True, True): 75.0}), "W4A8", 2, "top-1 %").endswith("not measured yet.")


def test_ablation_markdown_layout():
    md = ablation_markdown(_rows({(False, False, False): 70.0, (True, True, True): 75.25}), [("real", {"W4A8": 76.0})],
                           ["W4A8"], 2)
    lines = md.splitlines()
    assert lines[2] == "| r0 | – | – | – | 70.00 |" and lines[3] == "| r1 | ✓ | ✓ | ✓ | 75.25 |"
    assert lines[4] == "| *real* | | | | 76.00 |"


def test_detection_claim_picks_the_most_separating_setting():
    vals = {"real": {"W8A8": 0.28, "W4A8": 0.145}, "noise": {"W8A8": 0.28, "W4A8": 0.095},
            "dgh": {"W8A8": 0.28, "W4A8": 0.125}}
    text = detection_claim(vals, ["W8A8", "W4A8"])
    assert "at W4A8" in text and "recovers 60 %" in text and text.endswith("supported.")
    assert "not supported" in detection_claim({**vals, "dgh": {"W4A8": 0.10}}, ["W8A8", "W4A8"])
    assert "not measured" in detection_claim({"real": {"W8A8": 0.2}, "noise": {"W8A8": 0.21}}, ["W8A8"])


def test_params_ablation_label_is_validated():
    base = {"models": {"m": {"weights": None}}}
    ok = parse_params({**base, "generate": {"s": {"model": "m", "method": "dgh", "ablation": "2-all-stats",
                                                  "statistics": "batch"}}})
    assert ok.generate["s"].ablation == "2-all-stats" and ok.generate["s"].config.statistics.value == "batch"
    assert ok.generate["s"].to_json_dict()["ablation"] == "2-all-stats"
    with pytest.raises(ParamsError, match="ablation"):
        parse_params({**base, "generate": {"s": {"model": "m", "method": "dgh", "ablation": "bad label!"}}})


def test_report_renders_the_ablation_section_apart_from_the_main_table(tmp_path):
    import json

    from dgh.report import collect, render_markdown, table_markdown

    exp = {"preset": "pot", "w_bits": 4, "a_bits": 8, "algorithm": "mse"}
    gen = {"model": "m", "n_images": 4, "iterations": 1, "batch_size": 2}
    data = {
        "models": {"m": {"name": "resnet20_cifar10"}},
        "generate": {
            "real": {"model": "m", "method": "real", "data": "train", "n_images": 4},
            "noise": {"model": "m", "method": "noise", "n_images": 4},
            "a1": {**gen, "method": "batch-bns", "ablation": "1-batch-stats"},
            "a4": {**gen, "method": "dgh", "ablation": "4-dgh"},
        },
        "imagenet": {"eval": {"m": {"data": "test"}},
                     "experiments": {f"{s}-w4a8": {"model": "m", "calib": s, **exp} for s in ("real", "noise", "a1", "a4")}},
    }
    params = parse_params(data, tmp_path)
    for item, v in {"m-float": 81.0, "real-w4a8": 78.0, "noise-w4a8": 70.0, "a1-w4a8": 76.5, "a4-w4a8": 78.25}.items():
        d = tmp_path / "stages" / "evaluate_imagenet" / item
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"top1": v, "n_images": 100}))
    cells = collect(params, tmp_path)
    main = table_markdown(cells, "imagenet", "m")
    assert "1-batch-stats" not in main and "4-dgh" not in main and "| real |" in main
    md = render_markdown(params, cells)
    section = md.split("## Ablation: m")[1]
    assert "| 1-batch-stats | – | – | – | 76.50 |" in section and "| 4-dgh | ✓ | ✓ | ✓ | 78.25 |" in section
    assert "| *real* | | | | 78.00 |" in section and "| *noise* | | | | 70.00 |" in section
    assert "DGH − baseline +1.75" in section


def test_mlflow_tags_carry_the_ablation_variant():
    from dgh.pipeline.common import experiment_tags

    exp = {"preset": "pot", "w_bits": 4, "a_bits": 8, "algorithm": "mse"}
    params = parse_params({
        "models": {"m": {"name": "resnet20_cifar10"}},
        "generate": {"a": {"model": "m", "method": "dgh", "ablation": "dgh-minus-aug-mimicry", "flip": False},
                     "d": {"model": "m", "method": "dgh"}},
        "imagenet": {"eval": {"m": {"data": "test"}},
                     "experiments": {"ea": {"model": "m", "calib": "a", **exp}, "ed": {"model": "m", "calib": "d", **exp}}},
    })
    assert experiment_tags(params, "ea", "quantize")["dgh.ablation"] == "dgh-minus-aug-mimicry"
    assert "dgh.ablation" not in experiment_tags(params, "ed", "quantize")
