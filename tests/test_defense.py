"""TERD defense: reversed loss, reversion, model detection, input detection, guard, resume, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import typer
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from conftest import GaussianOracle, oracle_denoiser
from terd.cli import app
from terd.defense import reversion as rev
from terd.defense.input_detection import (
    BackdoorInputError,
    CandidateSetDetector,
    InputDetector,
    gchisq_sf,
    guard_inputs,
    guarded_sample,
    imhof_sf,
    llr,
    load_input_detector,
    tail_method,
)
from terd.defense.loss import reversed_loss, reversed_losses
from terd.defense.model_detection import (
    Thresholds,
    candidate_features,
    detect_model,
    fit_thresholds,
    kl_features,
    kl_peak_window,
    kl_per_dim,
    peak_local_kl,
)
from terd.defense.reversion import ReversionConfig, probe_features, reverse_trigger
from terd.defense.trigger import Trigger, load_candidates
from terd.errors import TerdError
from terd.models import NoiseSchedule, save_pipeline

SHAPE = (1, 8, 8)


class LinearBackdoorOracle(nn.Module):
    """Exact eps for a fully backdoored point-mass model plus an attack bias k_t * R that does not depend on eps.

    x_t = sqrt(abar) y + gamma_b sqrt(1-abar) eps + r_b; eps_theta = eps + k_t R (BadDiffusion-style target).
    """

    def __init__(self, schedule, y, r_b, gamma_b, bias):  # noqa: ANN001
        super().__init__()
        self.abars = schedule.alphas_cumprod
        self.register_buffer("y", y)
        self.register_buffer("r_b", r_b)
        self.register_buffer("bias", bias)
        self.g = gamma_b
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):  # noqa: ANN001
        a = self.abars[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.y - self.r_b) / (self.g * (1 - a).sqrt()) + (t.view(-1, 1, 1, 1) / 1000) * self.bias


class BackdoorMixtureOracle(nn.Module):
    """Exact E[eps | x_t] for a model trained on a mixture of benign data N(m, s^2) and a TrojDiff-style backdoor
    x_t = sqrt(abar) y + sqrt(1-abar) (gamma_b eps + mu), y ~ N(y0, s_y^2), poison rate p_bd.

    It behaves backdoored only near the trigger and benign elsewhere, like a real backdoored network.
    """

    def __init__(self, schedule, m, s, mu, gamma_b, y0, s_y=0.1, p_bd=0.1):  # noqa: ANN001
        super().__init__()
        self.abars = schedule.alphas_cumprod
        for k, v in {"m": m, "mu": mu, "y0": y0}.items():
            self.register_buffer(k, v)
        self.s, self.g, self.s_y, self.p = s, gamma_b, s_y, p_bd
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):  # noqa: ANN001
        a = self.abars[t].view(-1, 1, 1, 1).to(x.dtype)
        d = x[0].numel()
        mb, vb = a.sqrt() * self.m, a * self.s**2 + 1 - a
        md, vd = a.sqrt() * self.y0 + (1 - a).sqrt() * self.mu, a * self.s_y**2 + (1 - a) * self.g**2
        eb = (1 - a).sqrt() * (x - mb) / vb
        ed = (1 - a).sqrt() * self.g * (x - md) / vd
        llb = -0.5 * ((x - mb) ** 2 / vb).flatten(1).sum(1) - 0.5 * d * vb.flatten().log() + math.log(1 - self.p)
        lld = -0.5 * ((x - md) ** 2 / vd).flatten(1).sum(1) - 0.5 * d * vd.flatten().log() + math.log(self.p)
        w = torch.sigmoid(lld - llb).view(-1, 1, 1, 1)
        return (1 - w) * eb + w * ed


def _mu() -> torch.Tensor:
    return -(0.4 + 0.6 * torch.rand(SHAPE, generator=torch.Generator().manual_seed(1)))


def _mixture(schedule, gamma_b, p_bd=0.1):  # noqa: ANN001
    net = BackdoorMixtureOracle(schedule, torch.zeros(SHAPE), 0.5, _mu(), gamma_b, torch.full(SHAPE, 0.5), p_bd=p_bd)
    return oracle_denoiser(net, schedule, SHAPE)


SMALL = ReversionConfig(name="test", stage1_iters=200, stage2_iters=10, batch_size=8, noises_per_x0=4, clip_scale=10)


# ---------------------------------------------------------------- reversed loss

def test_two_noise_loss_is_the_papers_formula(schedule):
    den = oracle_denoiser(GaussianOracle(torch.zeros(SHAPE), 0.5, schedule), schedule, SHAPE)
    g = torch.Generator().manual_seed(0)
    r, gamma = torch.randn(SHAPE, generator=g), torch.rand(SHAPE, generator=g) + 0.5
    x0, t = torch.randn((5, *SHAPE), generator=g), torch.randint(990, 1000, (5,), generator=g)
    eps = torch.randn((2, 5, *SHAPE), generator=g)
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    d = [eps[i] - den(a.sqrt() * x0 + gamma * (1 - a).sqrt() * eps[i] + r, t) for i in range(2)]
    manual = 0.5 * (d[0] - d[1]).pow(2).sum(dim=(1, 2, 3)).mean()
    assert torch.allclose(reversed_loss(den, r, gamma, x0, t, 1.0, eps), manual, rtol=1e-5)


@pytest.mark.parametrize("shared_x0", [True, False])
def test_stacked_candidates_equal_one_call_each(schedule, shared_x0):
    """reversed_losses on M candidates in one network call equals reversed_loss on each (same draws)."""
    g = torch.Generator().manual_seed(3)
    den = oracle_denoiser(GaussianOracle(torch.zeros(SHAPE), 0.5, schedule), schedule, SHAPE)
    r, gamma = torch.randn((3, *SHAPE), generator=g), torch.rand((3, *SHAPE), generator=g) + 0.5
    x0 = torch.randn((5, *SHAPE) if shared_x0 else (3, 5, *SHAPE), generator=g)
    t, eps = torch.randint(0, 1000, (5,), generator=g), torch.randn((4, 5, *SHAPE), generator=g)
    stacked = reversed_losses(den, r, gamma, x0, t, 0.7, eps)
    one_each = torch.stack([reversed_loss(den, r[m], gamma[m], x0 if shared_x0 else x0[m], t, 0.7, eps)
                            for m in range(3)])
    assert stacked.shape == (3,) and torch.allclose(stacked, one_each, rtol=1e-6)


@pytest.mark.parametrize("gamma_b", [1.0, 0.6])
def test_reversed_loss_cancels_attack_terms(schedule, gamma_b):
    """At the true trigger the loss is exactly zero although the model's output carries an attack bias."""
    g = torch.Generator().manual_seed(0)
    y, r_b, bias = torch.rand(SHAPE, generator=g), -torch.rand(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    den = oracle_denoiser(LinearBackdoorOracle(schedule, y, r_b, gamma_b, bias), schedule, SHAPE)
    t = torch.randint(990, 1000, (6,), generator=g)
    eps = torch.randn((4, 6, *SHAPE), generator=g)
    gamma = torch.full(SHAPE, gamma_b)
    x0 = y.expand(6, *SHAPE)
    loss = reversed_loss(den, r_b, gamma, x0, t, 1.0, eps)
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    plain_mse = (eps[0] - den(a.sqrt() * x0 + gamma * (1 - a).sqrt() * eps[0] + r_b, t)).pow(2).sum(dim=(1, 2, 3))
    assert float(loss) < 1e-6 and float(plain_mse.mean()) > 1.0
    wrong = reversed_loss(den, r_b, torch.full(SHAPE, gamma_b * 1.3), x0, t, 1.0, eps)
    assert float(wrong) > 1.0  # the noise scale is identified


# ---------------------------------------------------------------- reversion

@pytest.mark.parametrize("gamma_b", [1.0, 0.6])
def test_reversion_recovers_trigger_of_backdoored_gaussian_oracle(schedule, gamma_b):
    mu = _mu()
    res = reverse_trigger(_mixture(schedule, gamma_b), SMALL, seed=0)
    r, gamma = res.trigger.r, res.trigger.gamma
    cos = torch.nn.functional.cosine_similarity(r.flatten(), mu.flatten(), dim=0)
    assert cos > 0.9
    assert abs(float(gamma.mean()) - gamma_b) < 0.05
    benign = reverse_trigger(_mixture(schedule, gamma_b, p_bd=1e-9), SMALL, seed=0)
    assert abs(float(benign.trigger.gamma.mean()) - 1.0) < 0.05  # learned gamma returns to the benign value
    fb, fbd = kl_features(benign.trigger), kl_features(res.trigger)
    assert fbd["M_r"] > 3 * fb["M_r"]
    per = SMALL.noises_per_x0 * SMALL.batch_size
    assert res.network_evaluations == 2 * (per * res.iterations["stage1"] + (   # two gamma starts
        SMALL.ddim_steps * 8 + 2 * 4 * 8) * res.iterations["stage2"])
    assert res.network_evaluations == SMALL.network_evaluations_bound()
    assert [c["gamma_init"] for c in res.candidates] == [1.0, 0.5] and sum(c["reported"] for c in res.candidates) == 1
    assert res.features == {**{f: max(c[f] for c in res.candidates) for f in ("M_r", "V_r", "P_r")},
                            # + the model's own, from the probe (8 x 8): its localization when the first look
                            # kept a patch-shaped window, else 1
                            "L_p": 64 / res.patch_probe["leading_support"]
                            if res.patch_probe["found_by"] == "first look" else 1.0,
                            "W_p": res.patch_probe["explained_offset"]}
    assert kl_features(res.trigger)["M_r"] == pytest.approx(res.features["M_r"])  # the most anomalous is reported


def test_any_anomalous_candidate_flags_the_model():
    """The scan statistic is each feature's maximum over candidates: one TrojDiff-like candidate is enough."""
    benign_like = {"M_r": 0.04, "V_r": 0.002}
    trojan_like = {"M_r": 0.12, "V_r": 0.0026}
    badnet_like = {"M_r": 0.03, "V_r": 0.016}
    thr = Thresholds(0.07, 0.004, {"n_models": 3})
    assert detect_model(candidate_features([benign_like, benign_like]), thr).verdict == "benign"
    assert detect_model(candidate_features([benign_like, trojan_like]), thr).flagged_by == ["M_r"]
    assert candidate_features([trojan_like, badnet_like]) == {"M_r": 0.12, "V_r": 0.016}
    patch_like = {"M_r": 0.03, "V_r": 0.002, "P_r": 0.4}
    assert candidate_features([{**benign_like, "P_r": 0.1}, patch_like])["P_r"] == 0.4
    with pytest.raises(ValueError):
        candidate_features([])


def test_line_search_start_lands_in_the_trojan_valley(schedule):
    """The searched candidate starts next to the backdoor's gamma and along the direction of mu."""
    from dataclasses import replace

    mu = _mu()
    cfg = replace(SMALL, starts=("reference", "line-search"), stage1_iters=1, stage2_iters=1)
    res = reverse_trigger(_mixture(schedule, 0.6), cfg, seed=0)
    (start,) = res.history["start"]
    assert start["candidate"] == 1 and start["gamma"] in (0.5, 0.6, 0.7)  # grid points next to the true 0.6
    cand = res.candidate_triggers[1]
    assert torch.nn.functional.cosine_similarity(cand.r.flatten(), mu.flatten(), dim=0) > 0.9
    assert res.network_evaluations == cfg.network_evaluations_bound()  # the search is counted
    assert cfg.searched_gammas() == {1: [0.7, 0.6, 0.5, 0.4]}  # only the searched candidate's nearest gammas
    search = 4 * (1 + 2 * len(cfg.search_radii)) * cfg.noises_per_x0 * cfg.batch_size
    assert cfg.network_evaluations_bound() == replace(cfg, starts=()).network_evaluations_bound() + search


def test_descent_start_reaches_the_valley_without_line_points(schedule):
    """With no line radii the only points are r = 0 and the fixed-gamma descent's end, which must beat r = 0.

    (Whether descent reaches a trojan valley depends on the trained network: on the exact mixture oracle it walks
    away from mu, as on tiny-digits models; on the tiny-photos32-dc blend model it walks in. That is measured by
    benchmarks/bench_descent_start.py, not here.)
    """
    from dataclasses import replace

    cfg = replace(SMALL, starts=("reference", "line-search"), search_radii=(), search_gammas=(0.5,),
                  descent_iters=30, descent_lr=0.05, stage1_iters=1, stage2_iters=1)
    res = reverse_trigger(_mixture(schedule, 0.6), cfg, seed=0)
    (start,) = res.history["start"]
    assert start["rule"] == "descent" and start["gamma"] == 0.5 and start["r_l2"] > 0
    assert res.network_evaluations == cfg.network_evaluations_bound()  # descent + its shared-batch check counted
    k, b = cfg.noises_per_x0, cfg.batch_size
    assert cfg.network_evaluations_bound() == replace(cfg, descent_iters=0).network_evaluations_bound() + 31 * k * b


def test_a_losing_descent_leaves_the_run_bit_identical(schedule):
    """When a line point beats the descent, the descent's own draws change nothing that follows."""
    from dataclasses import replace

    cfg = replace(SMALL, starts=("reference", "line-search"), stage1_iters=5, stage2_iters=2)
    den = _mixture(schedule, 0.6)
    plain = reverse_trigger(den, cfg, seed=0)
    tried = reverse_trigger(den, replace(cfg, descent_iters=2, descent_lr=1e-4), seed=0)
    assert tried.history["start"][0]["rule"] == "line"
    for a, b in zip(plain.candidate_triggers, tried.candidate_triggers, strict=True):
        assert torch.equal(a.r, b.r) and torch.equal(a.gamma, b.gamma)
    assert tried.network_evaluations - plain.network_evaluations == 3 * cfg.noises_per_x0 * cfg.batch_size


def test_adam_resume_equals_uninterrupted(schedule, tmp_path):
    den = _mixture(schedule, 0.6)
    cfg = ReversionConfig(stage1_iters=12, stage2_iters=4, batch_size=4, noises_per_x0=3, clip_scale=10,
                          checkpoint_every=5, optimizer="adam", lr=0.05, gamma_optimizer="adam",
                          starts=("reference", "line-search"))
    full = reverse_trigger(den, cfg, seed=3)
    ckpt = tmp_path / "ck.safetensors"
    with pytest.raises(KeyboardInterrupt):
        reverse_trigger(den, cfg, seed=3, checkpoint=ckpt, progress=_interrupt_at(1, 7))
    resumed = reverse_trigger(den, cfg, seed=3, checkpoint=ckpt, resume=True)
    assert torch.equal(full.trigger.r, resumed.trigger.r) and torch.equal(full.trigger.gamma, resumed.trigger.gamma)
    assert full.network_evaluations == resumed.network_evaluations


def test_model_is_frozen_and_weights_get_no_gradient(tiny_unet, schedule):
    from terd.models import Denoiser

    den = Denoiser(tiny_unet, schedule, (1, 8, 8))
    cfg = ReversionConfig(stage1_iters=2, stage2_iters=1, batch_size=2, ddim_steps=2)
    res = reverse_trigger(den, cfg, seed=0)
    assert all(not p.requires_grad and p.grad is None for p in tiny_unet.parameters())
    assert not tiny_unet.training
    assert res.network_evaluations == 2 * (2 * 2 * 2 + 1 * (2 * 2 + 2 * 2 * 2))  # 2 gamma starts


def test_fast_preset_is_over_10x_cheaper_than_paper():
    from dataclasses import replace

    paper, fast = rev.PRESETS["paper"], rev.PRESETS["fast"]
    assert replace(paper, gamma_mode="fixed").network_evaluations_bound() == 3000 * 32 + 1000 * (160 + 64)
    assert replace(fast, gamma_mode="fixed").network_evaluations_bound() * 10 <= 3000 * 32 + 1000 * (160 + 64)
    assert paper.network_evaluations_bound() >= 10 * fast.network_evaluations_bound()
    assert (paper.lr, paper.batch_size, paper.ddim_steps, paper.noises_per_x0) == (0.5, 16, 10, 2)
    assert paper.resolved_l1((3, 32, 32)) == 5e-5 and paper.resolved_l1((3, 64, 64)) == 5e-4
    assert paper.resolved_clip((3, 32, 32)) == 0.01


def _interrupt_at(stage, it):  # noqa: ANN001, ANN202
    def progress(s, i, total, loss):  # noqa: ANN001
        if (s, i) == (stage, it):
            raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize("stop_at", [(1, 13), (2, 4)])
def test_resume_equals_uninterrupted(schedule, tmp_path, stop_at):
    den = _mixture(schedule, 0.6)
    cfg = ReversionConfig(stage1_iters=30, stage2_iters=8, batch_size=4, noises_per_x0=3, clip_scale=10,
                          checkpoint_every=5, early_stop_tol=1e-9, early_stop_window=7)
    full = reverse_trigger(den, cfg, seed=3)
    ckpt = tmp_path / "ck.safetensors"
    with pytest.raises(KeyboardInterrupt):
        reverse_trigger(den, cfg, seed=3, checkpoint=ckpt, progress=_interrupt_at(*stop_at))
    assert ckpt.is_file()
    resumed = reverse_trigger(den, cfg, seed=3, checkpoint=ckpt, resume=True)
    assert resumed.resumed_from is not None and resumed.resumed_from["stage"] == stop_at[0]
    assert torch.equal(full.trigger.r, resumed.trigger.r) and torch.equal(full.trigger.gamma, resumed.trigger.gamma)
    assert full.network_evaluations == resumed.network_evaluations
    assert full.history["stage1"] == resumed.history["stage1"]
    with pytest.raises(TerdError, match="different settings"):
        reverse_trigger(den, cfg, seed=4, checkpoint=ckpt, resume=True)


def test_early_stop_fires_when_the_trigger_stops_moving(schedule):
    """lr 0 and fixed gamma: the trigger never moves, so each stage stops at its first check past min_iters."""
    den = _mixture(schedule, 1.0)
    cfg = ReversionConfig(stage1_iters=40, stage2_iters=20, batch_size=2, lr=0.0, gamma_mode="fixed", ddim_steps=2,
                          early_stop_tol=1e-6, early_stop_window=5, min_iters=10, patch_probe=False)
    res = reverse_trigger(den, cfg, seed=0)
    assert res.stopped_early == {"stage1": True, "stage2": True}
    assert res.iterations == {"stage1": 10, "stage2": 10}
    assert res.network_evaluations < cfg.network_evaluations_bound()
    assert [m[:2] for m in res.history["movement"]] == [[1, 5], [1, 10], [2, 5], [2, 10]]


def test_gamma_modes(schedule):
    den = _mixture(schedule, 1.0)
    cfg = ReversionConfig(stage1_iters=3, stage2_iters=0, batch_size=2)
    from dataclasses import replace

    fixed = reverse_trigger(den, replace(cfg, gamma_mode="fixed"), seed=0).trigger
    assert torch.equal(fixed.gamma, torch.ones(SHAPE))
    ref = reverse_trigger(den, replace(cfg, gamma_mode="reference", gamma_lr=1e-3), seed=0).trigger
    assert float(ref.gamma.max()) < 0.1  # the reference init (0) barely moves at lr 1e-3
    with pytest.raises(TerdError):
        rev.get_config("fast", gamma_mode="nope")


# ---------------------------------------------------------------- model detection

def test_kl_features_closed_form():
    assert kl_features(Trigger(torch.zeros(SHAPE), torch.ones(SHAPE))) == {"M_r": 0.0, "V_r": 0.0, "P_r": 0.0}
    r, g = torch.randn(SHAPE), torch.rand(SHAPE) + 0.2
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(r.double(), g.double()),
                                            torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(kl_per_dim(r, g), ref)
    f = kl_features(Trigger(r, g))
    assert math.isclose(f["M_r"], float(ref.mean()), rel_tol=1e-9)
    assert math.isclose(f["V_r"], float(ref.var(unbiased=False)), rel_tol=1e-9)
    assert math.isfinite(kl_features(Trigger(r, torch.zeros(SHAPE)))["M_r"])  # gamma = 0 guarded
    pooled = torch.nn.functional.avg_pool2d(ref.mean(0, keepdim=True)[None], 2, stride=1)
    assert math.isclose(f["P_r"], float(pooled.max()), rel_tol=1e-9)


def test_peak_local_kl_sees_a_small_patch_that_the_means_miss():
    """A TrojDiff-style 2x2 patch (r 0.9, gamma 0.1) on 16 x 16: P_r is the patch's full KL, M_r 4/256 of it."""
    r, g = torch.zeros(1, 16, 16), torch.ones(1, 16, 16)
    r[:, 14:, 14:], g[:, 14:, 14:] = 0.9, 0.1
    per = -math.log(0.1) + (0.01 + 0.81 - 1) / 2
    f = kl_features(Trigger(r, g))
    assert math.isclose(f["P_r"], per, rel_tol=1e-6) and math.isclose(f["M_r"], per * 4 / 256, rel_tol=1e-6)
    assert kl_peak_window(kl_per_dim(r, g)) == {"value": pytest.approx(per), "row": 14, "col": 14, "size": 2}
    spike = torch.zeros(3, 8, 8)
    spike[1, 3, 3] = 1.2  # one dimension: the window mean over 4 pixels x 3 channels
    assert math.isclose(peak_local_kl(spike), 0.1, rel_tol=1e-6)
    assert peak_local_kl(torch.full((2, 1, 1), 0.5)) == pytest.approx(0.5)  # images smaller than the window
    with pytest.raises(ValueError):
        peak_local_kl(torch.zeros(8, 8))


def test_thresholds_fit_save_load_and_verdict(tmp_path):
    feats = [{"M_r": 0.1, "V_r": 0.01}, {"M_r": 0.2, "V_r": 0.03}, {"M_r": 0.15, "V_r": 0.02}]
    thr = fit_thresholds(feats, provenance={"preset": "fast"})
    assert math.isclose(thr.M_r, 0.15 + 3 * 0.05) and math.isclose(thr.V_r, 0.02 + 3 * 0.01)
    loaded = Thresholds.load(thr.save(tmp_path / "t.json"))
    assert (loaded.M_r, loaded.V_r) == (thr.M_r, thr.V_r) and loaded.provenance["n_models"] == 3
    v = detect_model({"M_r": 0.5, "V_r": 0.0}, loaded)
    assert v.verdict == "backdoored" and v.flagged_by == ["M_r"] and math.isclose(v.margin["M_r"], 0.5 - thr.M_r)
    assert math.isclose(v.margin_std["M_r"], (0.5 - thr.M_r) / 0.05)
    assert detect_model({"M_r": 0.1, "V_r": 0.01}, loaded).verdict == "benign"
    assert detect_model({"M_r": 9.0, "V_r": 9.0}, None).verdict == "uncalibrated"
    with pytest.raises(TerdError):
        fit_thresholds(feats[:1])
    assert "fewer than 6" in thr.provenance["warning"]  # 3 models: fitted, with a warning
    six = fit_thresholds([{"M_r": 0.1 + 0.01 * i, "V_r": 0.01} for i in range(6)])
    assert "warning" not in six.provenance
    assert thr.P_r is None and "P_r" not in thr.to_dict()  # features from scans made before P_r existed
    with_peak = fit_thresholds([{**f, "P_r": p} for f, p in zip(feats, (0.1, 0.12, 0.14), strict=True)])
    assert math.isclose(with_peak.P_r, 0.12 + 3 * 0.02)
    again = Thresholds.load(with_peak.save(tmp_path / "p.json"))
    assert again.P_r == with_peak.P_r
    v = detect_model({"M_r": 0.1, "V_r": 0.01, "P_r": 0.5}, again)
    assert v.verdict == "backdoored" and v.flagged_by == ["P_r"] and set(v.margin) == {"M_r", "V_r", "P_r"}
    v = detect_model({"M_r": 0.1, "V_r": 0.01, "P_r": 0.5}, loaded)  # an older file: decides on M_r, V_r
    assert v.verdict == "benign" and set(v.thresholds) == {"M_r", "V_r"} and v.unscored == []
    v = detect_model({"M_r": 0.1, "V_r": 0.01}, again)  # scores of an older scan: P_r cannot be judged
    assert v.verdict == "benign" and v.unscored == ["P_r"] and set(v.thresholds) == {"M_r", "V_r"}
    with pytest.raises(TerdError, match="scores lack V_r"):
        detect_model({"M_r": 0.1}, again)
    (tmp_path / "bad.json").write_text('{"M_r": "x"}')
    with pytest.raises(TerdError):
        Thresholds.load(tmp_path / "bad.json")


@pytest.mark.parametrize("feature", ["L_p", "W_p"])
def test_probe_features_fitted_on_their_own_benign_models_flag_alone_and_round_trip(tmp_path, feature):
    """L_p and W_p (the patch probe's localization and its window's excess offset) can be fitted on other benign
    models than the KL features -- those whose probe was recorded -- and the fit names them; each decides like any
    feature."""
    from terd.defense.model_detection import refit_feature

    base = fit_thresholds([{"M_r": 0.1, "V_r": 0.01, "P_r": 0.1}, {"M_r": 0.2, "V_r": 0.03, "P_r": 0.12},
                           {"M_r": 0.15, "V_r": 0.02, "P_r": 0.14}], provenance={"models": ["a", "b", "c"]})
    assert getattr(base, feature) is None
    thr = refit_feature(base, feature, [1.0, 2.0, 3.0], ["b", "d", "e"])
    assert math.isclose(getattr(thr, feature), 2.0 + 3 * 1.0) and thr.provenance["stats"][feature]["models"] == ["b", "d", "e"]
    assert (thr.M_r, thr.V_r, thr.P_r) == (base.M_r, base.V_r, base.P_r) and thr.provenance["models"] == ["a", "b", "c"]
    again = Thresholds.load(thr.save(tmp_path / "l.json"))
    assert getattr(again, feature) == getattr(thr, feature) and set(again.values()) == {"M_r", "V_r", "P_r", feature}
    v = detect_model({"M_r": 0.1, "V_r": 0.01, "P_r": 0.1, feature: 30.0}, again)
    assert v.verdict == "backdoored" and v.flagged_by == [feature] and math.isclose(v.margin_std[feature], 25.0)
    v = detect_model({"M_r": 0.1, "V_r": 0.01, "P_r": 0.1}, again)  # a scan without the probe: not judged
    assert v.verdict == "benign" and v.unscored == [feature]
    with pytest.raises(TerdError, match="optional feature"):
        refit_feature(base, "M_r", [1.0, 2.0], ["x", "y"])
    with pytest.raises(TerdError, match="one value per model"):
        refit_feature(base, feature, [1.0, 2.0], ["x"])


def test_default_thresholds_need_three_benign_models(tmp_path):
    from terd.defense.calibration import default_thresholds, install_defaults

    for preset in ("fast", "paper"):  # both shipped, each fitted with its own schedule
        shipped = default_thresholds(preset)
        assert shipped is not None and shipped.provenance["n_models"] >= 3 and shipped.provenance["preset"] == preset
    (tmp_path / "none.json").write_text(json.dumps({"presets": {"paper": None}}))
    assert default_thresholds("paper", tmp_path / "none.json") is None  # never calibrated: scan says so
    two = fit_thresholds([{"M_r": 0.1, "V_r": 0.01}, {"M_r": 0.2, "V_r": 0.02}])
    with pytest.raises(TerdError):
        install_defaults(two, "fast", tmp_path / "d.json")
    (tmp_path / "d.json").write_text(json.dumps({"presets": {"fast": two.to_dict()}}))
    assert default_thresholds("fast", tmp_path / "d.json") is None


def test_shipped_thresholds_were_not_fitted_on_the_demo_models():
    """The demo judges demo-benign and demo-trojdiff with the shipped thresholds: neither (nor a model with
    the same weights: the bench's d16-benign-s4-e35 and runs/benign/digits-s4-e35 are demo-benign) may be in a fit."""
    from terd.defense.calibration import default_thresholds

    twins = ("demo-benign", "demo-trojdiff", "s4-e35", "d2i-blend-e12")
    for preset in ("fast", "paper"):
        prov = default_thresholds(preset).provenance
        models = prov["models"] + [m for st in prov["stats"].values() for m in st.get("models", [])]  # + L_p's fit
        assert models and not [m for m in models for twin in twins if twin in m], (preset, models)


# ---------------------------------------------------------------- input detection

def test_gamma_one_reduces_to_paper_rule():
    r = torch.randn(SHAPE)
    x = torch.randn(1000, *SHAPE) + 0.5 * r
    det = InputDetector(r, None, fpr=None)
    exact = (x.flatten(1).double() @ r.flatten().double()) - r.double().pow(2).sum() / 2
    assert torch.equal(det.is_backdoor(x), exact > 0)  # r.x > ||r||^2 / 2
    assert torch.allclose(det.score(x), exact, atol=1e-4)  # float32 inputs: float32 products
    assert torch.allclose(det.score(x.double()), exact, atol=1e-10)


def test_llr_matches_brute_force_distributions():
    d = 6
    r, g = torch.randn(d).double(), (torch.rand(d) + 0.3).double()
    x = torch.randn(50, d).double()
    bd = torch.distributions.MultivariateNormal(r, covariance_matrix=torch.diag(g**2))
    be = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64))
    assert torch.allclose(llr(x, r, g), bd.log_prob(x) - be.log_prob(x), atol=1e-9)


def test_llr_torch_path_row_chunks_cover_every_input(monkeypatch):
    import terd.defense.input_detection as input_detection

    d = 48
    monkeypatch.setattr(input_detection.llr_kernel, "supports", lambda x: False)  # the CUDA path, on CPU
    monkeypatch.setattr(input_detection, "CHUNK_BYTES", 7 * d * 4)  # 7 rows per chunk, 37 inputs: ragged tail
    r, g = torch.randn(d), torch.rand(d) * 0.8 + 0.4
    x = torch.randn(37, d)
    xd, rd, gd = x.double(), r.double(), g.double()
    direct = (-(xd - rd).square() / (2 * gd.square()) + xd.square() / 2).sum(1) - gd.log().sum()
    assert torch.allclose(llr(x, r, g), direct, atol=1e-4)


@pytest.mark.parametrize("n", [0, 1, 4, 7])
@pytest.mark.parametrize("d", [1, 1024, 2500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_llr_kernel_matches_float64_reference(n, d, dtype):
    from terd.defense import llr_kernel

    gen = torch.Generator().manual_seed(n * 10_000 + d)
    x, a, b = torch.randn(n, d, generator=gen), torch.rand(d, generator=gen) - 0.5, torch.randn(d, generator=gen)
    x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)
    xd = x.double()
    expected = xd.square() @ a.double() + xd @ b.double()
    got = llr_kernel.quadratic_rows(x, a, b)
    assert got.dtype == torch.float64 and got.shape == (n,)
    tol = 1e-5 * d if dtype == torch.float32 else 1e-10 * d  # float32 blocks of 1024, float64 across blocks
    assert torch.allclose(got, expected, rtol=0, atol=tol)
    assert llr_kernel.supports(x) and not llr_kernel.supports(x.half()) and not llr_kernel.supports(x[None])


@pytest.mark.parametrize("n", [0, 3, 9])
@pytest.mark.parametrize("d", [5, 2500])
def test_llr_kernel_many_forms_match_one_form_at_a_time(n, d):
    from terd.defense import llr_kernel

    gen = torch.Generator().manual_seed(n + d)
    x, a, b = torch.randn(n, d, generator=gen), torch.rand(3, d, generator=gen) - 0.5, torch.randn(3, d, generator=gen)
    got = llr_kernel.quadratic_rows(x, a, b)
    assert got.shape == (n, 3) and got.dtype == torch.float64
    expected = x.double().square() @ a.double().T + x.double() @ b.double().T
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * d)
    for k in range(3):  # the same sums as the one-form kernel
        assert torch.allclose(got[:, k], llr_kernel.quadratic_rows(x, a[k], b[k]), rtol=0, atol=1e-9 * d)


def test_llr_many_matches_llr_per_law_on_every_path(monkeypatch):
    import terd.defense.input_detection as input_detection
    from terd.defense.input_detection import llr_many

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(11, 2, 8, 8, generator=gen)
    r1, r2 = torch.randn(2, 8, 8, generator=gen), torch.randn(2, 8, 8, generator=gen)
    learned = torch.rand(2, 8, 8, generator=gen) * 0.5 + 0.5
    ones, tiny = torch.ones(2, 8, 8), torch.full((2, 8, 8), 0.01)
    for laws in ([(r1, learned), (r2, ones)], [(r1, ones), (r2, ones)], [(r1, tiny), (r2, learned)], [(r1, learned)]):
        got = llr_many(x, laws)
        expected = torch.stack([llr(x, r, g) for r, g in laws], dim=1)
        assert got.shape == (11, len(laws)) and torch.allclose(got, expected, rtol=1e-6, atol=1e-4)
    monkeypatch.setattr(input_detection.llr_kernel, "supports", lambda x: False)  # CUDA-like: per-law torch path
    laws = [(r1, learned), (r2, learned)]
    assert torch.allclose(llr_many(x, laws), torch.stack([llr(x, r, g) for r, g in laws], dim=1), atol=1e-4)
    with pytest.raises(TerdError, match="values each"):
        llr_many(x, [(torch.zeros(3), torch.ones(3))])


def test_llr_kernel_row_slices_over_threads_cover_every_input(monkeypatch):
    from terd.defense import llr_kernel

    monkeypatch.setattr(llr_kernel, "PARALLEL_MIN_VALUES", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for n in (8, 13, 37):  # slices of whole 4-row groups, the ragged tail in the last slice
            x, a, b = torch.randn(n, 70), torch.rand(70) - 0.5, torch.randn(70)
            expected = x.double().square() @ a.double() + x.double() @ b.double()
            assert torch.allclose(llr_kernel.quadratic_rows(x, a, b), expected, rtol=0, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_llr_kernel_and_torch_path_agree_on_image_batches(monkeypatch):
    import terd.defense.input_detection as input_detection

    gen = torch.Generator().manual_seed(3)
    r, g = torch.randn(3, 32, 32, generator=gen), torch.rand(3, 32, 32, generator=gen) * 0.6 + 0.5
    x = torch.randn(9, 3, 32, 32, generator=gen)[:, :, ::1, :]  # not a multiple of 4 rows
    fused = llr(x, r, g)
    monkeypatch.setattr(input_detection.llr_kernel, "supports", lambda x: False)
    assert torch.allclose(fused, llr(x, r, g), rtol=0, atol=1e-2)  # torch float32 matvecs: ~1e-3 here


def test_llr_needs_no_dense_matrix_and_survives_tiny_gamma():
    d_big = (3, 128, 128)  # a d x d float64 matrix would need 19 GB
    r = torch.randn(d_big)
    det = InputDetector(r, None)  # gamma = 1: Gaussian closed form
    s = det.score(torch.randn(4, *d_big))
    assert s.shape == (4,) and torch.isfinite(s).all()
    tiny = torch.full(SHAPE, 1e-5)
    r = torch.randn(SHAPE)
    s = llr(torch.stack([r, r + 1e-6, torch.randn(SHAPE)]), r, tiny)
    assert torch.isfinite(s).all() and s[0] > 100 and s[2] < -1e6


@pytest.mark.parametrize("kind", ["gamma1", "mixed"])
def test_fpr_threshold_holds_on_benign_noise(kind):
    g = torch.Generator().manual_seed(5)
    r = 0.3 * torch.randn(SHAPE, generator=g)
    gamma = torch.ones(SHAPE) if kind == "gamma1" else 0.3 + 1.2 * torch.rand(SHAPE, generator=g)
    fpr, n = 0.01, 200_000
    det = InputDetector(r, gamma, fpr=fpr)
    assert det.method == ("gaussian-closed-form" if kind == "gamma1" else "imhof-generalized-chi-square")
    measured = float(det.is_backdoor(torch.randn((n, *SHAPE), generator=g)).double().mean())
    assert abs(measured - fpr) < 4 * math.sqrt(fpr * (1 - fpr) / n)
    bd = gamma * torch.randn((n, *SHAPE), generator=g) + r  # the expected TPR is right too
    assert abs(float(det.is_backdoor(bd).double().mean()) - det.expected_tpr()) < 0.01


def test_imhof_tail_matches_monte_carlo_and_gaussian():
    rng = np.random.default_rng(0)
    a, b, c = rng.normal(size=20) * 0.4, rng.normal(size=20), rng.normal(size=20) * 0.1
    z = rng.standard_normal((400_000, 20))
    q = (a * z**2 + b * z + c).sum(1)
    for thr in np.quantile(q, [0.5, 0.9, 0.99]):
        assert abs(gchisq_sf(a, b, c, thr) - (q > thr).mean()) < 2e-3
    from scipy.stats import norm

    assert math.isclose(gchisq_sf(np.zeros(3), np.array([1.0, 2.0, 2.0]), np.zeros(3), 3.0), norm.sf(1.0),
                        rel_tol=1e-9)


def test_a_tight_patch_trigger_has_an_exact_ceiling_no_detector_beats_and_computes_without_warnings():
    """2 x 2 pixels at gamma 0.1 (TrojDiff's patch at 16 px): the true law's own test (the Neyman-Pearson
    ceiling) matches Monte Carlo and no other law's detector at the same false-positive rate catches more of the
    true inputs (both laws are non-central chi-squares here; Imhof agrees with them, next test)."""
    import warnings

    r, gamma = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)  # pixels at r = 0, gamma = 1 add nothing to the LLR
    r[0, -2:, -2:], gamma[0, -2:, -2:] = 0.9, 0.1
    true = Trigger(r, gamma)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = InputDetector(true, fpr=5e-4)  # its expected TPR is best_possible_tpr
        ceiling = det.expected_tpr()
        shifted = InputDetector(Trigger(r * 14 / 9, torch.where(gamma < 1, 0.2, 1.0)), fpr=5e-4)
        rate = shifted.detection_rate(r, gamma)
    g = torch.Generator().manual_seed(0)
    assert 0.98 < ceiling < 0.999  # the 99.9% goal is out of reach for this trigger at this rate
    assert abs(det.is_backdoor(true.inputs(torch.randn(200_000, 1, 4, 4, generator=g))).double().mean()
               - ceiling) < 2e-3
    assert rate <= ceiling


@pytest.mark.parametrize("gamma_b", [0.1, 0.6, 1.7])
def test_one_gamma_patch_uses_the_noncentral_chi_square_and_agrees_with_imhof(gamma_b):
    """A trigger with one gamma over its support has a scaled non-central chi-square law: the closed form equals
    Imhof's integral to within its ~1e-9 accuracy at both tails, and a detector built on it holds its FPR on benign noise."""
    r, gamma = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    r[0, -2:, -2:], gamma[0, -2:, -2:] = 0.9, gamma_b
    det = InputDetector(r, gamma, fpr=1e-2)
    assert det.method == "noncentral-chi-square-closed-form"
    import warnings

    for law in (det.benign_law, det.backdoor_law):
        live = (law.a != 0) | (law.b != 0)
        for q in (det.threshold, law.mean - law.std, law.mean + 2 * law.std):
            exact = gchisq_sf(law.a, law.b, law.c, q)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # quad warns on some segments at gamma 0.1; terd keeps them quiet
                assert abs(exact - imhof_sf(law.a[live], law.b[live], float(law.c.sum()), q)) < 1e-8
    g = torch.Generator().manual_seed(1)
    n = 200_000
    assert abs(float(det.is_backdoor(torch.randn(n, 1, 4, 4, generator=g)).double().mean()) - 1e-2) < 4 * math.sqrt(
        1e-2 * 0.99 / n)


def test_imhof_tail_does_not_overflow_in_high_dimension():
    """Many dimensions with a large linear part make rho(u) exceed e^709 inside the integration range (a
    256x256 RGB trigger did); the tail must still come out, here close to its Gaussian limit (a -> 0)."""
    from scipy.stats import norm

    d = 10_000
    a, b, c = np.full(d, 1e-4), np.full(d, 10.0), np.zeros(d)
    sd = math.sqrt(float((2 * a**2 + b**2).sum()))
    q = float(a.sum()) + 3.0 * sd
    assert math.isclose(gchisq_sf(a, b, c, q), norm.sf(3.0), rel_tol=1e-2)
    assert tail_method(a, b) == "imhof-generalized-chi-square"  # lambda 2.5e13: too large for scipy's series


def test_guard_rejects_flagged_inputs_before_generation():
    r = torch.full(SHAPE, -1.0)
    det = InputDetector(r, None)
    benign = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    x_T = torch.cat([benign, torch.randn(2, *SHAPE) + r])
    calls = []

    def sampler(den, x, **kw):  # noqa: ANN001
        calls.append(x.shape[0])
        return x

    with pytest.raises(BackdoorInputError, match="2 of 6"):
        guarded_sample(None, x_T, det, sampler=sampler)
    assert calls == []
    out, rep = guarded_sample(None, x_T, det, on_flag="drop", sampler=sampler)
    assert out.shape[0] == 4 and rep.n_flagged == 2 and calls == [4]
    kept, rep = guard_inputs(det, x_T, on_flag="report")
    assert kept.shape[0] == 6 and rep.flagged.tolist() == [False] * 4 + [True] * 2


# ---------------------------------------------------------------- trigger files and CLI

runner = CliRunner()


def _one_line_exit2(args):  # noqa: ANN001, ANN202
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


def test_calibrate_help_recommends_the_count_below_which_fit_thresholds_warns():
    from terd.defense.model_detection import FEW_BENIGN_MODELS

    models = next(p for p in typer.main.get_command(app).commands["calibrate"].params if p.name == "models")
    assert f"{FEW_BENIGN_MODELS} or more recommended" in models.help


def test_trigger_round_trip_and_bad_files(tmp_path):
    t = Trigger(torch.randn(SHAPE), torch.rand(SHAPE) + 0.5, meta={"preset": "fast"})
    back = Trigger.load(t.save(tmp_path / "t.safetensors"), SHAPE)
    assert torch.equal(back.r, t.r) and torch.equal(back.gamma, t.gamma)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TerdError, match="corrupt"):
        Trigger.load(tmp_path / "bad.safetensors")
    with pytest.raises(TerdError, match="expected"):
        Trigger.load(tmp_path / "t.safetensors", (3, 8, 8))


def test_cli_check_inputs(tmp_path):
    r = torch.full(SHAPE, -1.0)
    Trigger(r, torch.ones(SHAPE)).save(tmp_path / "trigger.safetensors")
    x = torch.cat([torch.randn(5, *SHAPE), torch.randn(3, *SHAPE) + r])
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    np.save(tmp_path / "x.npy", x.numpy())
    res = runner.invoke(app, ["check-inputs", str(tmp_path / "x.npy"), "--trigger", str(tmp_path / "trigger.safetensors"),
                              "--out", str(tmp_path / "flags.json")])
    assert res.exit_code == 0, res.output
    assert "3 of 8 inputs flagged" in res.output
    rep = json.loads((tmp_path / "flags.json").read_text())
    assert rep["flags"] == [False] * 5 + [True] * 3 and rep["detector"]["target_fpr"] == 1e-3


def test_candidate_set_detector_flags_when_any_candidate_does_and_keeps_the_fpr():
    d = 16
    shape = (1, 4, 4)
    shift = torch.zeros(shape)
    shift[0, 0] = 3.0
    a = Trigger(shift, torch.ones(shape))  # a shift on the first row
    b = Trigger(torch.zeros(shape), torch.full(shape, 0.3))  # a shrink everywhere
    one = CandidateSetDetector([a], fpr=0.01)
    single = InputDetector(a, fpr=0.01)
    x = torch.randn(500, *shape)
    assert torch.allclose(one.score(x), single.score(x) - single.threshold)  # one candidate: the plain detector
    both = CandidateSetDetector([a, b], fpr=0.02)
    assert [det.fpr for det in both.detectors] == [0.01, 0.01]  # fpr / k each
    xa, xb = a.inputs(torch.randn(2000, *shape)), b.inputs(torch.randn(2000, *shape))
    for xs in (xa, xb):  # each candidate's backdoor inputs are caught by the set
        assert both.is_backdoor(xs).double().mean() >= max(det.is_backdoor(xs).double().mean() for det in both.detectors)
    assert both.is_backdoor(xa).double().mean() > 0.9 and both.is_backdoor(xb).double().mean() > 0.9
    benign = torch.randn(200_000, d).reshape(-1, *shape)
    measured = float(both.is_backdoor(benign).double().mean())
    assert both.false_positive_bound() == pytest.approx(0.02, rel=1e-3)
    assert measured <= 0.02 + 3 * math.sqrt(0.02 / 200_000)  # the union bound holds
    assert measured > 0.01  # and the set flags more benign noise than one candidate alone would
    near_benign = Trigger(torch.full(shape, 0.05), torch.full(shape, 0.99))  # misses almost all its own inputs
    kept = CandidateSetDetector([near_benign, a], fpr=0.02)
    assert kept.kept == [1] and kept.own_tpr[0] < 0.1 and kept.detectors[0].fpr == 0.02  # the whole budget to a
    assert CandidateSetDetector([near_benign], fpr=0.02).kept == [0]  # one candidate is always used
    assert CandidateSetDetector([near_benign, a], fpr=None).kept == [0, 1]  # paper rule: nothing to split
    with pytest.raises(TerdError, match="differ in shape"):
        CandidateSetDetector([a, Trigger(torch.zeros(2, 4, 4), torch.ones(2, 4, 4))])
    with pytest.raises(TerdError, match="no candidate"):
        CandidateSetDetector([])


def test_cli_check_inputs_with_a_candidates_file(tmp_path):
    from terd.defense.trigger import save_candidates

    shift = Trigger(torch.full(SHAPE, -1.0), torch.ones(SHAPE))
    shrink = Trigger(torch.zeros(SHAPE), torch.full(SHAPE, 0.3))
    save_candidates([shift, shrink], tmp_path / "candidates.safetensors")
    x = torch.cat([torch.randn(5, *SHAPE), shift.inputs(torch.randn(3, *SHAPE)), shrink.inputs(torch.randn(2, *SHAPE))])
    np.save(tmp_path / "x.npy", x.numpy())
    res = runner.invoke(app, ["check-inputs", str(tmp_path / "x.npy"), "--trigger", str(tmp_path / "candidates.safetensors"),
                              "--out", str(tmp_path / "flags.json")])
    assert res.exit_code == 0, res.output
    assert "5 of 10 inputs flagged" in res.output and "any of 2 candidates flags" in res.output
    rep = json.loads((tmp_path / "flags.json").read_text())
    assert rep["flags"] == [False] * 5 + [True] * 5 and rep["detector"]["fpr_bound"] <= 1e-3 + 1e-9
    save_file({"x": torch.randn(2, 3, 8, 8)}, str(tmp_path / "wrong.safetensors"))
    assert "expected" in _one_line_exit2(["check-inputs", tmp_path / "wrong.safetensors", "--trigger",
                                          tmp_path / "candidates.safetensors"])
    assert "no such file" in _one_line_exit2(["check-inputs", tmp_path / "x.npy", "--trigger", tmp_path / "none.safetensors"])
    save_file({"r_0": torch.zeros(8, 8), "gamma_0": torch.ones(8, 8)}, str(tmp_path / "flat.safetensors"))
    assert "C x H x W" in _one_line_exit2(["check-inputs", tmp_path / "x.npy", "--trigger", tmp_path / "flat.safetensors"])


def test_cli_bad_inputs_exit_2_one_line(tmp_path):
    Trigger(torch.zeros(SHAPE), torch.ones(SHAPE)).save(tmp_path / "trigger.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    save_file({"x": torch.randn(2, 3, 8, 8)}, str(tmp_path / "wrong.safetensors"))
    assert "no such" in _one_line_exit2(["scan", tmp_path / "missing", "--out", tmp_path / "o"])
    assert "corrupt" in _one_line_exit2(["check-inputs", tmp_path / "wrong.safetensors", "--trigger",
                                         tmp_path / "corrupt.safetensors"])
    assert "expected" in _one_line_exit2(["check-inputs", tmp_path / "wrong.safetensors", "--trigger",
                                          tmp_path / "trigger.safetensors"])
    save_file({"x": torch.randn(2, *SHAPE)}, str(tmp_path / "ok.safetensors"))
    assert "--fpr" in _one_line_exit2(["check-inputs", tmp_path / "ok.safetensors", "--trigger",
                                       tmp_path / "trigger.safetensors", "--fpr", "2"])
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    assert "did not write" in _one_line_exit2(["scan", tmp_path / "missing", "--out", tmp_path / "user"])
    assert "at least 2" in _one_line_exit2(["calibrate", tmp_path / "m1", "--out", tmp_path / "t.json"])
    assert "unknown preset" in _one_line_exit2(["scan", tmp_path / "m", "--out", tmp_path / "o", "--preset", "x"])


def _tiny_model(tmp_path, tiny_unet, schedule):  # noqa: ANN001, ANN202
    return save_pipeline(tiny_unet, schedule, tmp_path / "model")


def test_cli_scan_end_to_end_with_thresholds_and_resume(tmp_path, tiny_unet, schedule, monkeypatch):
    """A real scan of a (random, tiny) diffusers model with a tiny schedule: files, report, exit codes."""
    monkeypatch.setitem(rev.PRESETS, "fast", ReversionConfig(name="fast", stage1_iters=2, stage2_iters=1,
                                                             batch_size=2, ddim_steps=2, checkpoint_every=1))
    from terd.defense import calibration

    monkeypatch.setattr(calibration, "DEFAULTS_FILE", tmp_path / "no-defaults.json")
    model = _tiny_model(tmp_path, tiny_unet, schedule)
    out = tmp_path / "scan"
    res = runner.invoke(app, ["scan", str(model), "--out", str(out), "--samples", "1"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["verdict"] == "uncalibrated" and "no calibrated threshold" in rep["note"]
    assert rep["coverage_warning"] is None  # an eps-prediction VP model: the family terd is measured on
    detail = rep["network_evaluations_detail"]
    assert detail["reversion"] == 2 * (2 * 4 + 1 * (2 * 2 + 2 * 2 * 2))  # 2 gamma starts
    assert detail["patch_probe"] >= 512 and rep["network_evaluations"] == detail["reversion"] + detail["patch_probe"]
    assert rep["trigger_movement"] == [] and not any(rep["stopped_early"].values())  # no early-stop check here
    for f in ("trigger.safetensors", "trigger.png", "samples.png", "candidates.safetensors"):
        assert (out / f).is_file()
    trig = Trigger.load(out / rep["trigger_file"], (1, 8, 8))
    assert kl_features(trig)["M_r"] == pytest.approx(rep["scores"]["M_r"])
    cands = load_candidates(out / rep["candidates_file"])  # the reversion's candidates, then the probe's (if any)
    assert len(cands) == len(rep["candidates"]) + rep["patch_probe"]["candidate"]
    reversion = cands[:len(rep["candidates"])]  # the scores can be recomputed without a rescan
    assert {**candidate_features([kl_features(c) for c in reversion]), **probe_features(rep["patch_probe"])} == \
        pytest.approx(rep["scores"])  # KL features from the candidates, L_p from the probe's summary
    assert rep["input_detection"]["rule"] == "any candidate flags"
    kept = rep["input_detection"]["kept_candidates"]  # those whose own TPR clears the bar (a random net's probe
    assert len(rep["input_detection"]["candidates"]) == len(kept) and set(kept) <= set(range(len(cands)))  # may not)
    assert rep["input_detection"]["fpr_bound"] <= 1e-3 + 1e-9  # Imhof tail: ~1e-9 absolute
    peak = rep["kl_peak"]
    assert peak["value"] == pytest.approx(rep["scores"]["P_r"]) and 0 <= peak["row"] < 8 and 0 <= peak["col"] < 8
    thr = Thresholds(-1.0, -1.0, {"n_models": 3, "warning": "a held-out benign model exceeds these"}, P_r=-1.0)
    thr.save(tmp_path / "thr.json")
    res = runner.invoke(app, ["scan", str(model), "--out", str(out), "--thresholds", str(tmp_path / "thr.json"),
                              "--fail-on-backdoor", "--resume", "--samples", "0"])
    assert res.exit_code == 1, res.output  # everything is over a negative threshold
    assert "over: M_r, V_r, P_r" in res.output and "local anomaly (P_r) at rows" in res.output
    assert f"terd check-inputs NOISES --trigger {out / 'candidates.safetensors'}" in res.output
    rep2 = json.loads((out / "report.json").read_text())
    assert rep2["verdict"] == "backdoored" and rep2["scores"] == rep["scores"]  # resumed from the finished run
    # these thresholds have no L_p or W_p: the probe is not over them, so input detection keeps the any-candidate
    # screen (terd.defense.implicated), and so does check-inputs on the scan's file
    assert rep2["input_detection"]["rule"] == "any candidate flags"
    assert load_input_detector(out / "candidates.safetensors").implicated is None
    assert rep["thresholds_warning"] is None and rep2["thresholds_warning"] == "a held-out benign model exceeds these"
    assert "thresholds warning: a held-out benign model exceeds these" in res.output  # where the user sees it
    res = runner.invoke(app, ["scan", str(model), "--out", str(out), "--thresholds", str(tmp_path / "thr.json"),
                              "--resume", "--samples", "0"])
    assert res.exit_code == 0
    # with the probe over its thresholds, its candidate and every candidate over M_r / V_r outside its window
    Thresholds(-1.0, -1.0, {"n_models": 3}, P_r=-1.0, L_p=-1.0, W_p=-1e9).save(tmp_path / "thr2.json")
    res = runner.invoke(app, ["scan", str(model), "--out", str(out), "--thresholds", str(tmp_path / "thr2.json"),
                              "--resume", "--samples", "0"])
    assert res.exit_code == 0, res.output
    rep3 = json.loads((out / "report.json").read_text())
    det = load_input_detector(out / "candidates.safetensors")
    if rep["patch_probe"]["candidate"]:  # the random network's probe may find no window
        assert rep3["input_detection"]["rule"] == "any candidate the verdict implicates flags"
        assert rep3["input_detection"]["kept_candidates"] == det.kept == list(range(len(cands)))
    else:
        assert rep3["input_detection"]["rule"] == "any candidate flags" and det.implicated is None


@pytest.mark.slow
def test_fast_scan_of_shipped_benign_model(tmp_path):
    res = runner.invoke(app, ["scan", "src/terd/assets/models/demo-benign", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["network_evaluations"] <= rev.PRESETS["paper"].network_evaluations_bound() / 10
    assert all(0.8 < c["gamma_mean"] < 1.2 for c in rep["candidates"])  # both candidates return to benign gamma
    assert rep["verdict"] == "benign"  # held out: not one of the models the shipped thresholds were fitted on


def test_cli_calibrate_writes_thresholds(tmp_path, tiny_unet, schedule, monkeypatch):
    monkeypatch.setitem(rev.PRESETS, "fast", ReversionConfig(name="fast", stage1_iters=2, stage2_iters=1,
                                                             batch_size=2, ddim_steps=2, gamma_mode="fixed"))
    a = save_pipeline(tiny_unet, schedule, tmp_path / "a")
    torch.manual_seed(1)
    for p in tiny_unet.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    b = save_pipeline(tiny_unet, schedule, tmp_path / "b")
    res = runner.invoke(app, ["calibrate", str(a), str(b), "--out", str(tmp_path / "thr.json")])
    assert res.exit_code == 0, res.output
    thr = Thresholds.load(tmp_path / "thr.json")
    assert thr.provenance["n_models"] == 2 and "warning" in thr.provenance and thr.provenance["preset"] == "fast"
    from terd.defense.calibration import architecture
    from terd.models import load_denoiser

    assert thr.provenance["applies_to"] == architecture(load_denoiser(a))  # both models are laid out alike
    (tmp_path / "mine.json").write_text("{}")
    assert "refusing" in _one_line_exit2(["calibrate", a, b, "--out", tmp_path / "mine.json"])
    # the user's thresholds on a model of another architecture still decide, with a warning that says so
    res = runner.invoke(app, ["scan", "src/terd/assets/models/demo-benign", "--out", str(tmp_path / "s"),
                              "--thresholds", str(tmp_path / "thr.json"), "--samples", "0"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["verdict"] in ("benign", "backdoored") and "fitted on models of another architecture" in \
        rep["thresholds_warning"] and "fewer than" in rep["thresholds_warning"]
    assert "thresholds warning:" in res.output


def test_detection_rate_against_another_law_matches_monte_carlo():
    shape = (1, 4, 4)
    det = InputDetector(Trigger(torch.full(shape, 0.8), torch.full(shape, 0.6)), fpr=0.01)
    assert det.detection_rate(det.r, det.gamma) == pytest.approx(det.expected_tpr(), abs=1e-9)  # its own law
    assert det.detection_rate(torch.zeros(shape), torch.ones(shape)) == pytest.approx(0.01, abs=1e-6)  # benign
    r_true, g_true = torch.full(shape, 0.5), torch.full(shape, 0.7)  # a trigger near, not at, the reversed one
    x = g_true * torch.randn(200_000, *shape, generator=torch.Generator().manual_seed(3)) + r_true
    measured = float(det.is_backdoor(x).double().mean())
    assert det.detection_rate(r_true, g_true) == pytest.approx(measured, abs=4 * math.sqrt(0.25 / 200_000))


def test_cli_scan_withholds_the_shipped_vp_thresholds_from_a_ve_model(tmp_path, tiny_unet, monkeypatch):
    """The shipped thresholds flag every recorded benign VE model: a VE scan without --thresholds gives no
    verdict and says why; the user's own thresholds still decide."""
    monkeypatch.setitem(rev.PRESETS, "fast", ReversionConfig(name="fast", stage1_iters=2, stage2_iters=1,
                                                             batch_size=2, ddim_steps=2, checkpoint_every=1))
    from terd.defense.calibration import default_thresholds

    assert default_thresholds("fast") is not None  # the shipped ones exist; they are withheld, not missing
    model = save_pipeline(tiny_unet, NoiseSchedule.edm(0.02, 20.0, 0.5, "exponential", 100), tmp_path / "ve")
    out = tmp_path / "scan"
    res = runner.invoke(app, ["scan", str(model), "--out", str(out), "--samples", "0"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["verdict"] == "uncalibrated" and rep["thresholds"] is None and "VE model" in rep["note"]
    assert "no verdict (terd's shipped thresholds are fitted on VP" in res.output
    assert "EDM-preconditioned" in rep["coverage_warning"]  # measured: terd misses backdoors on this family
    assert "warning: terd did not detect VillanDiffusion on EDM" in res.output
    Thresholds(-1.0, -1.0, {"n_models": 3}, P_r=-1.0).save(tmp_path / "thr.json")
    res = runner.invoke(app, ["scan", str(model), "--out", str(out), "--thresholds", str(tmp_path / "thr.json"),
                              "--resume", "--samples", "0"])
    assert res.exit_code == 0 and json.loads((out / "report.json").read_text())["verdict"] == "backdoored"


def test_shipped_thresholds_are_offered_only_to_the_architecture_they_were_fitted_on(tmp_path, tiny_unet):
    """KL features of benign models differ by architecture (threshold_scope.md): each shipped entry names the
    layout it was fitted on, and a model laid out otherwise gets none of them."""
    from terd.defense.calibration import (
        architecture,
        default_thresholds,
        install_defaults,
        preset_architecture,
        shipped_families,
    )
    from terd.models import load_denoiser

    demo = load_denoiser("src/terd/assets/models/demo-benign")
    assert architecture(demo) == preset_architecture("tiny-digits16") != preset_architecture("tiny-photos32-dc")
    assert preset_architecture("tiny-photos32") != preset_architecture("tiny-photos32-dc")  # 32 vs 8 norm groups
    for preset in ("fast", "paper"):
        assert default_thresholds(preset, model=demo).provenance["family"] == "tiny-digits16"
    assert "tiny-digits16" in shipped_families("fast")
    from terd.defense.scan import shipped_thresholds_for

    thr, source, note = shipped_thresholds_for(demo, "fast")
    assert source == "terd default for preset fast (tiny-digits16)" and note is None and thr is not None
    other = load_denoiser(save_pipeline(tiny_unet, NoiseSchedule.linear(), tmp_path / "m"))  # 1 x 8 x 8, 2 levels
    assert architecture(other) is not None and default_thresholds("fast", model=other) is None
    assert default_thresholds("fast") is not None  # without a model: the preset's own entry, as before
    # a maintainer's fit for another family is filed under PRESET@FAMILY and offered to that family only
    fit = fit_thresholds([{"M_r": m, "V_r": m / 10, "P_r": 2 * m} for m in (0.1, 0.11, 0.12)])
    path = tmp_path / "d.json"
    install_defaults(fit, "fast", path, family="tiny-digits16")
    assert default_thresholds("fast", path, model=other) is None
    twin = save_pipeline(tiny_unet, NoiseSchedule.linear(), tmp_path / "twin")
    data = json.loads(path.read_text())
    data["presets"]["fast@tiny"] = {**data["presets"]["fast"], "M_r": 9.0}
    data["presets"]["fast@tiny"]["provenance"] = {**data["presets"]["fast"]["provenance"], "family": "tiny",
                                                  "applies_to": architecture(load_denoiser(twin))}
    path.write_text(json.dumps(data))
    assert default_thresholds("fast", path, model=other).M_r == 9.0
    assert default_thresholds("fast", path, model=demo).M_r == pytest.approx(fit.M_r)
    assert shipped_families("fast", path) == ["tiny-digits16", "tiny"]
    lin = NoiseSchedule.linear()
    plain = oracle_denoiser(GaussianOracle(torch.zeros(1, 4, 4), 1.0, lin), lin, (1, 4, 4))
    assert architecture(plain) is None and default_thresholds("fast", model=plain) is None  # nothing to compare


def test_cli_scan_withholds_shipped_thresholds_from_another_architecture(tmp_path, tiny_unet, schedule, monkeypatch):
    """A VP model laid out unlike every shipped fit gets no verdict from them, and the note names the families
    terd covers; the demo's architecture still gets its thresholds."""
    monkeypatch.setitem(rev.PRESETS, "fast", ReversionConfig(name="fast", stage1_iters=2, stage2_iters=1,
                                                             batch_size=2, ddim_steps=2, checkpoint_every=1))
    out = tmp_path / "scan"
    res = runner.invoke(app, ["scan", str(_tiny_model(tmp_path, tiny_unet, schedule)), "--out", str(out),
                              "--samples", "0"])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["verdict"] == "uncalibrated" and rep["thresholds_withheld"] and rep["thresholds_source"] is None
    assert "fitted on tiny-digits16" in rep["note"] and "laid out differently" in rep["note"]
    assert "no verdict (terd ships thresholds for preset fast fitted on tiny-digits16" in res.output
