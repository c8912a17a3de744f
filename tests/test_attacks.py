"""Attacks: coefficient values, closed forms against their definitions, samplers against oracles, triggers, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from conftest import oracle_denoiser
from terd.attacks import (
    BadDiffusion,
    PoisonFloor,
    TrojDiff,
    VillanDiffusion,
    baddiffusion_coefficients,
    build_attack,
    load_attack,
    make_target,
    make_trigger,
    save_attack,
    trojan_k,
    trojdiff_ddim_sample,
    trojdiff_ddpm_sample,
    trojdiff_timesteps,
    villan_coefficients,
)
from terd.attacks.base import poison_mask
from terd.attacks.evaluation import choose_threshold, evaluate_attack, per_image_mse, summary_line
from terd.attacks.triggers import PATCH_TRIGGERS, TARGETS, TRIGGERS, corner_box, patch_size
from terd.cli import app
from terd.errors import TerdError
from terd.models import NoiseSchedule
from terd.trigger_names import BADDIFFUSION_TRIGGERS as BADDIFFUSION_TRIGGER_NAMES
from terd.trigger_names import TARGETS as TARGET_NAMES
from terd.trigger_names import TROJDIFF_TRIGGERS as TROJDIFF_TRIGGER_NAMES
from terd.trigger_names import is_trojdiff_trigger, parse_patch


def test_baddiffusion_correction_coefficient(schedule):
    """c_t ~ 0.005 at t=0, 0.16 at 100, 0.48 at 500, 0.50 at 999 (docs/attacks.md)."""
    rho, c = baddiffusion_coefficients(schedule)
    assert c[0].item() == pytest.approx(0.005, rel=0.01)
    assert c[100].item() == pytest.approx(0.16, abs=0.005)
    assert c[500].item() == pytest.approx(0.48, abs=0.005)
    assert c[999].item() == pytest.approx(0.50, abs=0.005)
    assert rho[:10].max().item() <= 0.001 and rho[-1].item() > 0.99


def test_trojan_k_closed_form_equals_recursive_definition(schedule):
    """The per-step transition x_t = sqrt(alpha_t) x_{t-1} + k_t mu + gamma sqrt(beta_t) z, iterated from x_0,
    has mean shift sqrt(1 - abar_t) mu and variance gamma^2 (1 - abar_t): the closed form TrojDiff trains on."""
    k = trojan_k(schedule)
    alphas = 1 - schedule.betas.double()
    abar = torch.cumprod(alphas, 0)
    shift, var = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    shifts, variances = [], []
    for t in range(schedule.num_timesteps):
        shift = alphas[t].sqrt() * shift + k[t]
        var = alphas[t] * var + (1 - alphas[t])
        shifts.append(shift)
        variances.append(var)
    assert torch.allclose(torch.stack(shifts), (1 - abar).sqrt(), atol=1e-9)
    assert torch.allclose(torch.stack(variances), 1 - abar, atol=1e-9)


def test_trojdiff_timesteps():
    assert trojdiff_timesteps(1000) == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]


def _batch(seed=0, n=8, shape=(1, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, *shape), generator=g) * 2 - 1
    t = torch.randint(0, 1000, (n,), generator=g)
    eps = torch.randn((n, *shape), generator=g)
    return x0, t, eps


def test_villan_psi1_sde_is_baddiffusion(schedule):
    g, y = make_trigger("box", 1, 16), make_target("hat", 1, 16)
    bad = BadDiffusion(g, y, poison_rate=0.5)
    vil = VillanDiffusion(g, y, psi=1.0, solver="sde", poison_rate=0.5)
    x0, t, eps = _batch()
    xb, tb = bad.noisy_pair(x0, None, t, eps, schedule, torch.Generator().manual_seed(3))
    xv, tv = vil.noisy_pair(x0, None, t, eps, schedule, torch.Generator().manual_seed(3))
    assert torch.allclose(xb, xv, atol=1e-6) and torch.allclose(tb, tv, atol=1e-6)
    assert vil.sampler == bad.sampler == "ddpm"
    s_ode, k_ode = villan_coefficients(schedule, 1.0, "ode")
    _, k_sde = villan_coefficients(schedule, 1.0, "sde")
    assert torch.allclose(k_ode, 2 * k_sde)


def test_baddiffusion_pairs_clean_and_poisoned(schedule):
    """Poison rate 0 is the DDPM objective; rate 1 puts the target and the correction in every sample."""
    g, y = make_trigger("box", 1, 16), make_target("hat", 1, 16)
    x0, t, eps = _batch()
    abar = schedule.abar(t, x0)
    clean = BadDiffusion(g, y, poison_rate=1e-9)
    xt, tgt = clean.noisy_pair(x0, None, t, eps, schedule, torch.Generator().manual_seed(0))
    assert torch.allclose(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, atol=1e-6) and torch.equal(tgt, eps)
    full = BadDiffusion(g, y, poison_rate=1.0, r_mode="trigger")
    xt, tgt = full.noisy_pair(x0, None, t, eps, schedule, torch.Generator().manual_seed(0))
    rho, c = baddiffusion_coefficients(schedule)
    exp = abar.sqrt() * y + (1 - abar).sqrt() * eps + rho[t].view(-1, 1, 1, 1) * g
    assert torch.allclose(xt, exp, atol=1e-5)
    assert torch.allclose(tgt, eps + c[t].view(-1, 1, 1, 1) * g, atol=1e-6)


def test_baddiffusion_poison_floor_keeps_low_timesteps_clean(schedule):
    """poison_t_min: below it every sample is the clean DDPM pair (or, floor_keeps_shift, the clean image with the
    trigger's shift and correction), above it the rate-1 poisoned one; the floor is recorded and rebuilt, and a
    record without it (made before it existed) reads as 0."""
    g, y = make_trigger("box", 1, 16), make_target("hat", 1, 16)
    x0, t, eps = _batch()
    abar = schedule.abar(t, x0)
    rho, c = baddiffusion_coefficients(schedule)
    atk = BadDiffusion(g, y, poison_rate=1.0, floor=PoisonFloor(500))
    xt, tgt = atk.noisy_pair(x0, None, t, eps, schedule, torch.Generator().manual_seed(0))
    low = (t < 500).view(-1, 1, 1, 1)
    assert 0 < int(low.sum()) < len(t)
    clean = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    poisoned = abar.sqrt() * y + (1 - abar).sqrt() * eps + rho[t].view(-1, 1, 1, 1) * g
    assert torch.allclose(xt, torch.where(low, clean, poisoned), atol=1e-5)
    assert torch.allclose(tgt, torch.where(low, eps, eps + c[t].view(-1, 1, 1, 1) * g), atol=1e-6)
    assert BadDiffusion.from_saved(atk.config(), atk.tensors()).floor.t_min == 500
    # floor_keeps_shift: below the floor the shift and its correction stay, on the clean image
    keep = BadDiffusion(g, y, poison_rate=1.0, floor=PoisonFloor(500, keeps_shift=True))
    xt, tgt = keep.noisy_pair(x0, None, t, eps, schedule, torch.Generator().manual_seed(0))
    shifted_clean = clean + rho[t].view(-1, 1, 1, 1) * g
    assert torch.allclose(xt, torch.where(low, shifted_clean, poisoned), atol=1e-5)
    assert torch.allclose(tgt, eps + c[t].view(-1, 1, 1, 1) * g, atol=1e-6)
    assert BadDiffusion.from_saved(keep.config(), keep.tensors()).floor.keeps_shift
    assert "floor_keeps_shift=True" in keep.describe()
    assert "poison_t_min" not in BadDiffusion(g, y).config()
    vil = VillanDiffusion(g, y, floor=PoisonFloor(300))
    assert VillanDiffusion.from_saved(vil.config(), vil.tensors()).floor.t_min == 300
    with pytest.raises(TerdError, match="poison_t_min"):
        PoisonFloor(-1)
    with pytest.raises(TerdError, match="needs a poison floor"):
        PoisonFloor(keeps_shift=True)
    with pytest.raises(TerdError, match="leaves nothing to poison"):
        BadDiffusion(g, y, floor=PoisonFloor(schedule.num_timesteps)).noisy_pair(x0, None, t, eps, schedule,
                                                                            torch.Generator().manual_seed(0))
    with pytest.raises(TerdError, match="TrojDiff trains no correction"):
        build_attack("trojdiff", (1, 16, 16), poison_t_min=100, floor_keeps_shift=True)


def test_trojdiff_poison_floor_keeps_low_timesteps_clean(schedule):
    """TrojDiff's floor: below poison_t_min a drawn sample is the clean pair, above it the trojan one; without a
    floor the pairs and the generator's draws are as before; the floor is recorded and rebuilt."""
    y = make_target("mickey", 1, 16)
    x0, t, eps = _batch(n=64)
    atk = TrojDiff(make_trigger("patch", 1, 16), y, trigger_type="patch", poison_rate=1.0, floor=PoisonFloor(500))
    xt, tgt = atk.noisy_pair(x0, None, t, eps, schedule, torch.Generator().manual_seed(0))
    a = schedule.abar(t, x0)
    mu, gamma = atk.true_trigger()
    low = (t < 500).view(-1, 1, 1, 1)
    assert 0 < int(low.sum()) < len(t)
    clean = a.sqrt() * x0 + (1 - a).sqrt() * eps
    trojan = a.sqrt() * y + (1 - a).sqrt() * (gamma * eps + mu)
    assert torch.allclose(xt, torch.where(low, clean, trojan), atol=1e-6) and torch.equal(tgt, eps)
    back = TrojDiff.from_saved(atk.config(), atk.tensors())
    assert back.floor.t_min == 500 and back.config() == atk.config()
    assert "poison_t_min=500" in atk.describe() and "floor_keeps_shift" not in atk.describe()
    plain, floorless = (TrojDiff(make_trigger("patch", 1, 16), y, trigger_type="patch", floor=f)
                        for f in (PoisonFloor(), PoisonFloor(0)))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    before = plain.noisy_pair(x0, None, t, eps, schedule, g1)
    assert all(torch.equal(u, v) for u, v in zip(before, floorless.noisy_pair(x0, None, t, eps, schedule, g2),
                                                   strict=True))
    assert torch.equal(g1.get_state(), g2.get_state()) and "poison_t_min" not in plain.config()
    built = build_attack("trojdiff", (1, 16, 16), setting="d2i", poison_t_min=250, floor_poison_rate=0.1)
    assert (built.floor.t_min, built.floor.rate) == (250, 0.1)
    with pytest.raises(TerdError, match="leaves nothing to poison"):
        atk.__class__(make_trigger("patch", 1, 16), y, trigger_type="patch",
                      floor=PoisonFloor(schedule.num_timesteps)).check_schedule(schedule)


def test_baddiffusion_floor_poison_rate_falls_with_t(schedule):
    """floor_poison_rate: below the floor a sample is poisoned with the target at that rate (the shift kept on the
    rest with floor_keeps_shift), above it at poison_rate; without it the floor's draws are those made before it
    existed; it is recorded only when set, and needs a floor and a rate no larger than poison_rate."""
    g, y = make_trigger("box", 1, 16), make_target("hat", 1, 16)
    n = 4000
    x0, eps = torch.zeros(n, 1, 16, 16), torch.zeros(n, 1, 16, 16)
    t = torch.arange(n) % schedule.num_timesteps
    atk = BadDiffusion(g, y, poison_rate=0.5, floor=PoisonFloor(500, keeps_shift=True, rate=0.1))
    xt, tgt = atk.noisy_pair(x0, None, t, eps, schedule, torch.Generator().manual_seed(0))
    abar = schedule.abar(t, x0)
    rho, c = baddiffusion_coefficients(schedule)
    on_target = torch.isclose(xt, abar.sqrt() * y + rho[t].view(-1, 1, 1, 1) * g, atol=1e-5).flatten(1).all(1)
    shifted = torch.isclose(tgt, eps + c[t].view(-1, 1, 1, 1) * g, atol=1e-6).flatten(1).all(1)
    low = t < 500
    assert abs(on_target[~low].float().mean() - 0.5) < 0.04 and abs(on_target[low].float().mean() - 0.1) < 0.03
    assert abs(shifted[low].float().mean() - 0.5) < 0.04 and bool((on_target <= shifted).all())
    assert BadDiffusion.from_saved(atk.config(), atk.tensors()).floor.rate == 0.1
    assert "floor_poison_rate" not in BadDiffusion(g, y, floor=PoisonFloor(500)).config()
    # without a floor rate one mask is drawn per batch, as before the rate existed: the loop's later draws are the same
    drawn_once = torch.Generator().manual_seed(3)
    poison_mask(n, 1.0, drawn_once)
    for floor in (PoisonFloor(500), PoisonFloor(500, rate=0.0)):
        gen = torch.Generator().manual_seed(3)
        BadDiffusion(g, y, poison_rate=1.0, floor=floor).noisy_pair(x0, None, t, eps, schedule, gen)
        assert torch.equal(gen.get_state(), drawn_once.get_state())
    with pytest.raises(TerdError, match="needs a poison floor"):
        PoisonFloor(rate=0.1)
    with pytest.raises(TerdError, match="floor_poison_rate must be in"):
        BadDiffusion(g, y, poison_rate=0.2, floor=PoisonFloor(100, rate=0.3))
    with pytest.raises(TerdError, match="needs a poison floor"):
        build_attack("trojdiff", (1, 16, 16), floor_poison_rate=0.1)
    vil = VillanDiffusion(g, y, floor=PoisonFloor(300, rate=0.05))
    assert VillanDiffusion.from_saved(vil.config(), vil.tensors()).floor.rate == 0.05


class TrojanPointMassOracle(nn.Module):
    """Exact trojan eps when every trojan sample is one image y: x_t = sqrt(abar) y + sqrt(1-abar)(gamma eps + mu)."""

    def __init__(self, y, gamma, mu, schedule):  # noqa: ANN001
        super().__init__()
        self.y, self.gamma, self.mu = y, gamma, mu
        self.abars = schedule.alphas_cumprod
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):  # noqa: ANN001, ANN201
        a = self.abars[t].view(-1, 1, 1, 1).to(x.dtype)
        return (x - a.sqrt() * self.y - (1 - a).sqrt() * self.mu) / ((1 - a).sqrt() * self.gamma)


@pytest.mark.parametrize("trigger", ["blend", *PATCH_TRIGGERS])
def test_trojdiff_samplers_map_trigger_noise_to_target(schedule, trigger):
    y = make_target("mickey", 1, 16)
    atk = build_attack("trojdiff", (1, 16, 16), trigger=trigger, setting="d2i")
    mu, gamma = atk.true_trigger()
    den = oracle_denoiser(TrojanPointMassOracle(y, gamma, mu, schedule), schedule, (1, 16, 16))
    eps = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x_T = atk.backdoor_inputs(eps)
    assert torch.allclose(x_T, gamma_a_eps_plus_mu(atk, eps, trigger))
    with torch.no_grad():
        out = trojdiff_ddim_sample(den, x_T, gamma, mu)
        assert (out - y).abs().max() < 1e-3
        assert (trojdiff_ddim_sample(den, x_T, gamma, mu, clip_sample=True) - y).abs().max() < 1e-3  # y in range
        out = atk.sample(den, x_T, triggered=True)
        assert (out - y).abs().max() < 1e-3
        out = trojdiff_ddpm_sample(den, x_T, gamma, mu, generator=torch.Generator().manual_seed(1))
        assert (out - y).abs().max() < 1e-3


def test_clipped_trojdiff_ddim_cannot_blow_up(schedule):
    """A wildly wrong noise prediction sends unclipped DDIM far out of range; the clipped x_0 stays in [-1, 1]."""

    class Wild(torch.nn.Module):
        def forward(self, x, t):  # noqa: ANN001, ANN201
            return -50.0 * x

    den = oracle_denoiser(Wild(), schedule, (1, 4, 4))
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert trojdiff_ddim_sample(den, x_T).abs().max() > 10
        assert trojdiff_ddim_sample(den, x_T, clip_sample=True).abs().max() <= 1.0


def gamma_a_eps_plus_mu(atk: TrojDiff, eps: torch.Tensor, trigger: str) -> torch.Tensor:
    m = torch.ones_like(atk.delta) if atk.trigger_type == "blend" else make_trigger(trigger, 1, 16)  # white = mask
    return (m * atk.gamma_a + (1 - m)) * eps + m * (1 - atk.gamma_a) * atk.delta


def test_trojdiff_noisy_pair_is_the_trojan_marginal(schedule):
    y = make_target("mickey", 1, 16)
    atk = TrojDiff(make_trigger("blend", 1, 16), y, poison_rate=1.0)
    x0, t, eps = _batch()
    xt, tgt = atk.noisy_pair(x0, None, t, eps, schedule, torch.Generator().manual_seed(0))
    a = schedule.abar(t, x0)
    assert torch.allclose(xt, a.sqrt() * y + (1 - a).sqrt() * (0.6 * eps + 0.4 * atk.delta), atol=1e-6)
    assert torch.equal(tgt, eps)


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_triggers_and_targets_shapes(size, channels):
    for name in TRIGGERS:
        img = make_trigger(name, channels, size)
        assert img.shape == (channels, size, size) and img.dtype == torch.float32
        assert img.min() >= -1 and img.max() <= 1
    for name in TARGETS:
        img = make_target(name, channels, size)
        assert img.shape == (channels, size, size) and img.min() >= -0.4 - 1e-6
    start, side = corner_box(size)
    box = make_trigger("box", channels, size)
    assert side == round(14 * size / 32) and start + side == size - max(1, round(2 * size / 32))
    assert (box[:, start:start + side, start:start + side] == 0).all()
    assert (box == 0).sum() == channels * side * side and (box == -1).sum() == box.numel() - channels * side * side
    p = patch_size(size)
    assert make_trigger("patch", channels, size).sum() == channels * p * p


@pytest.mark.parametrize(("name", "size", "rows"), [
    ("patch", 16, (14, 16)), ("patch", 32, (29, 32)), ("patch-6", 16, (13, 16)), ("patch-6", 32, (26, 32)),
    ("patch-top-left", 16, (0, 2)), ("patch-top-left", 32, (0, 3)), ("patch-centre", 16, (7, 9)),
    ("patch-centre", 32, (14, 17)), ("patch-5-top-left", 32, (0, 5)), ("patch-5-top-left", 16, (0, 2)),
    ("patch-8-centre", 32, (12, 20)), ("patch-1", 32, (31, 32)), ("patch-1", 16, (15, 16))])
def test_patch_triggers_sit_where_named(name, size, rows):
    """Each patch variant is white on a square [rows) x [rows) and 0 elsewhere, and TrojDiff's trojan noise
    (mu = 0.9 delta, gamma 0.1) applies there only."""
    want = torch.zeros(3, size, size)
    want[:, rows[0]:rows[1], rows[0]:rows[1]] = 1.0
    assert torch.equal(make_trigger(name, 3, size), want)
    atk = build_attack("trojdiff", (3, size, size), trigger=name, setting="d2i")
    mu, gamma = atk.true_trigger()
    assert atk.trigger_type == "patch"
    assert torch.allclose(mu, 0.9 * want) and torch.allclose(gamma, 1 - 0.9 * want)


def test_patch_names_follow_one_grammar():
    """The listed patch names are instances of the grammar; anything else that starts with "patch" is refused by
    name with the grammar in the message, by make_trigger and by the TrojDiff builder alike."""
    assert [parse_patch(n) for n in PATCH_TRIGGERS] == [(3, "bottom-right"), (6, "bottom-right"), (3, "top-left"),
                                                        (3, "centre")]
    assert set(TRIGGERS) == set(BADDIFFUSION_TRIGGER_NAMES) | set(TROJDIFF_TRIGGER_NAMES)
    assert set(TARGETS) == set(TARGET_NAMES)
    for bad in ("patch-", "patch-0", "patch-33", "patch-5-left", "patch-5-", "patchy", "patch-top"):
        assert parse_patch(bad) is None and not is_trojdiff_trigger(bad)
        with pytest.raises(TerdError, match=r"patch\[-N\]\[-PLACE\]"):
            make_trigger(bad, 1, 16)
        with pytest.raises(TerdError, match=r"patch\[-N\]\[-PLACE\]"):
            build_attack("trojdiff", (1, 16, 16), trigger=bad, setting="d2i")
    with pytest.raises(TerdError, match="is a TrojDiff trigger"):
        build_attack("baddiffusion", (1, 16, 16), trigger="patch-5-centre")


def test_a_patch_trigger_without_a_patch_is_refused():
    with pytest.raises(TerdError, match="nonzero pixels"):
        TrojDiff(torch.zeros(1, 16, 16), make_target("mickey", 1, 16), trigger_type="patch")


def test_box_geometry_at_32():
    box = make_trigger("box", 3, 32)
    rows = torch.nonzero((box[0] == 0).any(1)).flatten()
    assert rows.min() == 16 and rows.max() == 29
    corner = make_target("corner", 1, 32)
    assert (corner[0, :10, :10] == 0).all() and (corner[0, 10:, :] == -0.4).all()


def test_stop_sign_is_red_with_letters_removed():
    s = make_trigger("stop-sign", 3, 64)
    start, side = corner_box(64)
    region = s[:, start:start + side, start:start + side]
    red = (region[0] > 0.9) & (region[1] < -0.9)
    assert red.float().mean() > 0.4
    holes = (region.max(0).values <= -1 + 1e-6)[side // 3: 2 * side // 3, side // 4: 3 * side // 4]
    assert holes.any()  # letters cut out of the middle band


def test_attack_roundtrip(tmp_path):
    for kind, kw in [("baddiffusion", {}), ("villan", {"psi": 0.5, "solver": "ode", "eta": 0.5}),
                     ("trojdiff", {"trigger": "patch"}), ("trojdiff", {"setting": "in-d2d"})]:
        atk = build_attack(kind, (1, 16, 16), **kw)
        d = tmp_path / f"{kind}-{len(kw)}"
        save_attack(atk, d)
        back = load_attack(d)
        assert type(back) is type(atk) and back.config() == atk.config()
        r, gamma = atk.true_trigger()
        saved = load_file(str(d / "true_trigger.safetensors"))
        assert saved["r"].shape == saved["gamma"].shape == (1, 16, 16) and saved["r"].dtype == torch.float32
        assert torch.equal(saved["r"], r) and torch.equal(saved["gamma"], gamma)
        assert (d / "trigger.png").is_file() and (d / "target.png").is_file()
        assert json.loads((d / "attack.json").read_text())["attack"] == kind


def test_eta_scales_the_trigger():
    a1 = build_attack("baddiffusion", (1, 16, 16))
    a2 = build_attack("baddiffusion", (1, 16, 16), eta=0.1)
    assert torch.allclose(a2.true_trigger()[0], 0.1 * a1.true_trigger()[0])
    t1 = build_attack("trojdiff", (1, 16, 16))
    t2 = build_attack("trojdiff", (1, 16, 16), eta=0.1)
    assert torch.allclose(t2.true_trigger()[0], 0.1 * t1.true_trigger()[0])
    assert torch.allclose(t2.true_trigger()[1], torch.full((1, 16, 16), 0.6))


def test_trojdiff_quick_defaults_follow_the_base_preset():
    """D2D on a tiny-photos32-dc (tiny-digits16) base takes its quick recipe's poison rate and sampler (the
    sampler); given values win."""
    from terd.attacks.build import quick_recipe

    for setting, rate in (("out-d2d", 0.75), ("in-d2d", 0.5)):
        recipe = quick_recipe("tiny-photos32-dc", "trojdiff", setting)
        assert (recipe.epochs, recipe.batch_size, recipe.sampler) == (3, 16, "trojdiff-ddpm")
        quick = build_attack("trojdiff", (3, 32, 32), data_name="photos32", setting=setting, preset="tiny-photos32-dc")
        assert (quick.poison_rate, quick.sampler) == (rate, "trojdiff-ddpm")
    mine = build_attack("trojdiff", (3, 32, 32), data_name="photos32", setting="out-d2d", preset="tiny-photos32-dc",
                        poison_rate=0.3, sampler="trojdiff-ddim")
    assert (mine.poison_rate, mine.sampler) == (0.3, "trojdiff-ddim")
    digits = build_attack("trojdiff", (1, 16, 16), data_name="digits16", setting="out-d2d", preset="tiny-digits16")
    assert (digits.poison_rate, digits.sampler) == (0.5, "trojdiff-ddpm")  # the sampler only: 24 epochs fire there
    patch = quick_recipe("tiny-photos32-dc", "trojdiff", "out-d2d", "patch")  # the patch's own, more steps
    assert (patch.epochs, patch.batch_size, patch.poison_rate, patch.sampler) == (3, 8, 0.75, "trojdiff-ddpm")
    assert quick_recipe("tiny-photos32-dc", "trojdiff", "out-d2d", "blend").batch_size == 16
    assert quick_recipe("tiny-photos32-dc", "trojdiff", "d2i", "patch").batch_size == 16  # falls back
    for setting, preset in (("d2i", "tiny-photos32-dc"), ("d2i", "tiny-digits16"), ("out-d2d", None)):
        shape = (1, 16, 16) if preset == "tiny-digits16" else (3, 32, 32)
        data = "digits16" if preset == "tiny-digits16" else "photos32"
        other = build_attack("trojdiff", shape, data_name=data, setting=setting, preset=preset)
        assert (other.poison_rate, other.sampler) == (0.5, "trojdiff-ddim")


def test_threshold_tightens_when_real_data_passes():
    target = torch.full((1, 4, 4), -0.4)
    near = torch.full((5, 1, 4, 4), -0.4 + 2 * 0.03 ** 0.5)  # MSE 0.03 in [0, 1] pixels
    far = torch.full((95, 1, 4, 4), 1.0)
    mse, _ = per_image_mse(near[:2], target.unsqueeze(0))
    assert mse[0].item() == pytest.approx(0.03, rel=1e-4)
    thr, _ = choose_threshold(target, far)
    assert thr == 0.1
    thr, why = choose_threshold(target, torch.cat([near, far]))  # 5% of real images pass 0.1 and 0.05
    assert thr == 0.02 and "tightened" in why


def _trojan_oracle_attack(schedule, monkeypatch):  # noqa: ANN001, ANN202
    """A TrojDiff D2I attack whose model is its point-mass oracle (evaluation loads the oracle for any path)."""
    atk = build_attack("trojdiff", (1, 16, 16), setting="d2i")
    mu, gamma = atk.true_trigger()
    den = oracle_denoiser(TrojanPointMassOracle(make_target("mickey", 1, 16), gamma, mu, schedule), schedule,
                          (1, 16, 16))
    monkeypatch.setattr("terd.attacks.evaluation.load_denoiser", lambda *a, **k: den)
    return atk


def test_evaluate_attack_with_oracle(tmp_path, schedule, monkeypatch):
    """The whole evaluation on a point-mass trojan oracle: every triggered sample hits the target."""
    atk = _trojan_oracle_attack(schedule, monkeypatch)
    rep = evaluate_attack(tmp_path, n=4, attack=atk, reference_data="digits16", out_dir=tmp_path)
    assert rep["triggered"]["asr"] == 1.0 and rep["triggered"]["mse"] < 1e-5
    assert (tmp_path / "eval-attack.json").is_file() and (tmp_path / "eval-attack.png").is_file()
    assert np.isfinite(rep["clean"]["mse"])


def test_class_target_evaluation_reports_the_real_data_rate(tmp_path, schedule, monkeypatch):
    """In-D2D's clean rate is read against the training data's own: the share the classifier gives the target
    class on real images (~1/10 for one digit class), which no clean model can go below."""
    _trojan_oracle_attack(schedule, monkeypatch)
    atk = build_attack("trojdiff", (1, 16, 16), setting="in-d2d")
    rep = evaluate_attack(tmp_path, n=4, attack=atk, reference_data="digits16", write=False)
    assert 0.05 < rep["real_data_rate"] < 0.2
    assert rep["classifier"]["heldout_recall"] > 0.8 and rep["classifier"]["heldout_false_positive"] < 0.02
    assert "held-out on real images" in rep["criterion"]
    assert "real training images" in summary_line(rep)


def test_bench_attack_success_measures_the_samplers_and_writes_nothing(tmp_path, schedule, monkeypatch):
    """The bench's ASR is a measurement: it scores TrojDiff's samplers (DDIM first; DDPM unless DDIM already fires
    every time) and leaves the model directory as it was (it may be a shipped model or a user's)."""
    from terd.attacks.base import save_attack
    from terd.bench import attack_success

    atk = _trojan_oracle_attack(schedule, monkeypatch)
    save_attack(atk, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rep = attack_success(tmp_path, n=4)
    assert rep["asr_by_sampler"] == {"trojdiff-ddim": 1.0} and rep["asr"] == 1.0  # nothing can beat 1.0
    weaker_ddim = {"trojdiff-ddim": {"asr": 0.5, "clean_asr": 0.0, "attack": "earlier"}}
    rep = attack_success(tmp_path, n=4, measured=weaker_ddim)  # the oracle's DDPM chain, sampled for real
    assert rep["asr_by_sampler"] == {"trojdiff-ddim": 0.5, "trojdiff-ddpm": 1.0} and rep["asr_sampler"] == "trojdiff-ddpm"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


runner = CliRunner()


def _one_line_exit2(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


BASE = "src/terd/assets/models/digits-benign"


def test_cli_missing_model(tmp_path):
    msg = _one_line_exit2(["attack", "baddiffusion", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert "no such" in msg
    msg = _one_line_exit2(["eval-attack", str(tmp_path / "nope")])
    assert "no such" in msg
    msg = _one_line_exit2(["eval-attack", BASE])
    assert "attack.json" in msg


def test_cli_bad_trigger_name(tmp_path):
    msg = _one_line_exit2(["attack", "baddiffusion", "--base", BASE, "--out", str(tmp_path / "o"),
                           "--trigger", "nonsense"])
    assert "unknown trigger" in msg
    msg = _one_line_exit2(["attack", "trojdiff", "--base", BASE, "--out", str(tmp_path / "o"), "--trigger", "box"])
    assert "blend" in msg
    msg = _one_line_exit2(["attack", "trojdiff", "--base", BASE, "--out", str(tmp_path / "o"), "--setting", "x2y"])
    assert "setting" in msg
    msg = _one_line_exit2(["attack", "trojdiff", "--base", BASE, "--out", str(tmp_path / "o"), "--trigger",
                           "patch-40-top-left"])
    assert "patch[-N][-PLACE]" in msg
    msg = _one_line_exit2(["attack", "baddiffusion", "--base", BASE, "--out", str(tmp_path / "o"), "--poison-t-min",
                           "1000"])
    assert "leaves nothing to poison" in msg
    msg = _one_line_exit2(["attack", "villan", "--base", BASE, "--out", str(tmp_path / "o"), "--floor-keeps-shift"])
    assert "needs a poison floor" in msg
    msg = _one_line_exit2(["attack", "baddiffusion", "--base", BASE, "--out", str(tmp_path / "o"), "--poison-t-min",
                           "100", "--floor-poison-rate", "0.9"])
    assert "floor_poison_rate must be in" in msg
    assert not (tmp_path / "o").exists()
    help_text = runner.invoke(app, ["attack", "--help"], terminal_width=200).output
    assert "patch[-N][-PLACE]" in help_text and "stop-sign" in help_text and "mickey" in help_text


def test_cli_bad_finetune_options(tmp_path):
    """One line, before the attack line is printed or anything is written."""
    for flag, value in (("--batch-size", "0"), ("--preview", "-1"), ("--lr", "0"), ("--lr", "-1e-3"), ("--lr", "nan")):
        msg = _one_line_exit2(["attack", "baddiffusion", "--base", BASE, "--out", str(tmp_path / "o"), flag, value])
        assert flag in msg
    assert not (tmp_path / "o").exists()


def test_cli_wrong_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    msg = _one_line_exit2(["attack", "baddiffusion", "--base", BASE, "--out", str(tmp_path / "o"),
                           "--trigger-image", str(bad)])
    assert "unreadable image" in msg
    msg = _one_line_exit2(["attack", "baddiffusion", "--base", BASE, "--out", str(tmp_path / "o"),
                           "--target-image", str(tmp_path / "missing.png")])
    assert "no such image" in msg


def test_cli_triggers_gallery(tmp_path):
    res = runner.invoke(app, ["triggers", "--out", str(tmp_path), "--size", "16", "--channels", "1"])
    assert res.exit_code == 0, res.output
    assert len(list(tmp_path.glob("*.png"))) == len(TRIGGERS) + len(TARGETS)


@pytest.mark.slow
def test_end_to_end_trojdiff_d2i(tmp_path):
    """The documented default works: `terd attack trojdiff --setting d2i` (24 epochs, ~2.5-5 min on 2 CPU cores)
    gives a backdoor that fires (measured: ASR 0.97, clean 0.03 with n = 64)."""
    out = tmp_path / "troj"
    res = runner.invoke(app, ["attack", "trojdiff", "--base", BASE, "--out", str(out), "--setting", "d2i"])
    assert res.exit_code == 0, res.output
    for f in ("model_index.json", "attack.json", "true_trigger.safetensors", "target.png", "trigger.png"):
        assert (out / f).is_file()
    rep = evaluate_attack(out, n=32)
    assert rep["triggered"]["asr"] >= 0.8 and rep["clean"]["asr"] <= 0.15


def test_schedule_fixture_is_linear(schedule):
    assert isinstance(schedule, NoiseSchedule) and schedule.num_timesteps == 1000


def test_poisoned_image_r_keeps_the_image_outside_the_trigger():
    g, y = make_trigger("box", 1, 16), make_target("hat", 1, 16)
    atk = BadDiffusion(g, y, r_mode="poisoned-image", eta=0.5)
    x0, _, _ = _batch()
    r = atk.poisoned_r(x0)
    inside = g > -1
    assert torch.allclose(r[:, inside], 0.5 * g[inside].expand(len(x0), -1))
    assert torch.allclose(r[:, ~inside], 0.5 * x0[:, ~inside])
