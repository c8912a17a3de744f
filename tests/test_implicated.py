"""Which candidates input detection trusts once a model is flagged (terd.defense.implicated)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from terd.cli import app
from terd.defense.implicated import features_outside, implicated_candidates, trigger_window
from terd.defense.input_detection import CandidateSetDetector, load_input_detector
from terd.defense.model_detection import kl_features
from terd.defense.trigger import Trigger, save_candidates
from terd.errors import TerdError

SHAPE = (1, 8, 8)
CUTS = {"M_r": 0.1, "V_r": 0.2, "P_r": 0.5, "L_p": 2.0, "W_p": 0.2}


def _patch(value: float = 0.9, gamma: float = 0.1) -> Trigger:
    """A patch-probe candidate: a 2 x 2 window at rows/cols 6-7 holding ``value`` with noise scale ``gamma``."""
    window = torch.zeros(SHAPE, dtype=torch.bool)
    window[0, 6:8, 6:8] = True
    return Trigger(torch.where(window, value, 0.0), torch.where(window, gamma, 1.0))


def _candidates() -> list[Trigger]:
    at_patch = torch.zeros(SHAPE)
    at_patch[0, 6:8, 6:8] = -2.0  # the patch's place, the wrong value (what reversion finds on a patch model)
    at_patch[0, 0:2, 0:2] = -1.5  # and a local bump elsewhere: P_r outside the window, nothing image-wide
    wide = torch.full(SHAPE, 1.0)  # an image-wide shift: M_r 0.5
    return [Trigger(at_patch, torch.ones(SHAPE)), Trigger(wide, torch.ones(SHAPE)), _patch()]


def test_a_flagged_patch_model_keeps_the_probe_and_the_image_wide_candidates():
    cands = _candidates()
    window = trigger_window(cands[2])
    assert int(window.sum()) == 4
    outside = features_outside(cands[0], window)
    assert kl_features(cands[0])["P_r"] > CUTS["P_r"] and outside["P_r"] > CUTS["P_r"]  # a bump stays outside
    assert outside["M_r"] < CUTS["M_r"] and outside["V_r"] < CUTS["V_r"]
    # the probe implicated: it stands for the small trigger; reversion candidates count by M_r / V_r outside it
    assert implicated_candidates(cands, CUTS, 2, {"L_p": 16.0, "W_p": 0.8}) == [1, 2]
    assert implicated_candidates(cands, CUTS, 2, {"L_p": 1.0, "W_p": 0.8}) == [1, 2]  # W_p alone suffices
    # otherwise the any-candidate screen applies: the probe under its cuts, no probe candidate, no thresholds
    assert implicated_candidates(cands, CUTS, 2, {"L_p": 1.0, "W_p": 0.0}) == []
    assert implicated_candidates(cands[:2], CUTS, None, {"L_p": 16.0, "W_p": 0.8}) == []
    assert implicated_candidates(cands, None, 2, {"L_p": 16.0}) == []
    # a window that explains everything: the probe's candidate alone
    assert implicated_candidates([cands[0], cands[2]], CUTS, 1, {"L_p": 16.0}) == [1]


def test_the_budget_goes_to_the_implicated_candidates_only():
    cands = _candidates()
    every = CandidateSetDetector(cands, fpr=0.003)
    chosen = CandidateSetDetector(cands, fpr=0.003, implicated=[2])
    assert len(every.detectors) == 3 and every.implicated is None
    assert chosen.kept == [2] and [d.fpr for d in chosen.detectors] == [0.003]
    assert chosen.false_positive_bound() == pytest.approx(0.003, rel=1e-3)
    assert chosen.summary()["rule"] == "any candidate the verdict implicates flags"
    x = cands[2].inputs(torch.randn(20_000, *SHAPE, generator=torch.Generator().manual_seed(0)))
    caught = [float(det.is_backdoor(x).double().mean()) for det in (every, chosen)]
    assert caught[1] > caught[0]  # the whole budget on the patch catches more of its inputs
    assert chosen.detectors[0].expected_tpr() == pytest.approx(caught[1], abs=0.01)
    with pytest.raises(TerdError, match="out of range"):
        CandidateSetDetector(cands, implicated=[3])


def test_a_candidates_file_carries_what_the_verdict_implicated(tmp_path):
    cands = _candidates()
    save_candidates(cands, tmp_path / "c.safetensors", implicated=[2])
    det = load_input_detector(tmp_path / "c.safetensors")
    assert det.kept == [2] and len(det.detectors) == 1
    save_candidates(cands, tmp_path / "plain.safetensors")  # no verdict (or none implicated): every candidate
    assert load_input_detector(tmp_path / "plain.safetensors").implicated is None
    x = cands[2].inputs(torch.randn(4, *SHAPE))
    np.save(tmp_path / "x.npy", x.numpy())
    runner = CliRunner()
    res = runner.invoke(app, ["check-inputs", str(tmp_path / "x.npy"), "--trigger", str(tmp_path / "c.safetensors")])
    assert res.exit_code == 0, res.output
    assert "any of 1 candidates the scan's verdict implicates flags" in res.output
    tensors = {f"{k}_{i}": getattr(c, k) for i, c in enumerate(cands) for k in ("r", "gamma")}
    for bad in (torch.tensor([0.5]), torch.tensor([[0]]), torch.tensor([7])):
        save_file({**tensors, "implicated": bad}, str(tmp_path / "bad.safetensors"))
        res = runner.invoke(app, ["check-inputs", str(tmp_path / "x.npy"), "--trigger", str(tmp_path / "bad.safetensors")])
        assert res.exit_code == 2 and "bad.safetensors" in res.output and len(res.output.strip().splitlines()) == 1
