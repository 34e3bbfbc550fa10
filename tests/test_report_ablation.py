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
