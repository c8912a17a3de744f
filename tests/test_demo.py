"""The demo: shipped models present, refuses foreign output dirs, and (slow) gets both verdicts right."""

from __future__ import annotations

import json

import pytest

from terd.demo import DEMO_MODELS, asset_model, run_demo
from terd.errors import TerdError
from terd.models import load_denoiser


def test_demo_models_ship_and_load():
    for _, name in DEMO_MODELS:
        assert load_denoiser(asset_model(name)).image_shape == (1, 16, 16)
    assert (asset_model("demo-trojdiff") / "true_trigger.safetensors").is_file()


def test_demo_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(TerdError, match="not empty"):
        run_demo(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    summary = run_demo(tmp_path / "demo", echo=lambda s: None)
    assert summary["correct"], summary
    assert json.loads((tmp_path / "demo/summary.json").read_text())["correct"]
    chk = summary["models"]["backdoored"]["input_detection"]
    assert chk["flagged_backdoor_inputs"] > 0.9
    lo, hi = chk["fpr_sampling_range_95"]  # the binomial range a true FPR at the target reads in on n noises
    assert lo < chk["fpr_target"] < hi and chk["flagged_benign_inputs"] <= hi
    assert (tmp_path / "demo/backdoored/samples.png").is_file()


def test_demo_refuses_zero_workers(tmp_path):
    with pytest.raises(TerdError, match="--workers"):
        run_demo(tmp_path / "demo", workers=0)
    assert not (tmp_path / "demo").exists()
