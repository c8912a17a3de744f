"""The patch probe: finds a small patch from the model's response and reads its value, on closed-form oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import oracle_denoiser
from terd.defense import patch_probe as pp
from terd.defense.input_detection import CandidateSetDetector
from terd.defense.reversion import ReversionConfig, probe_features, reverse_trigger
from terd.errors import TerdError

SHAPE = (1, 16, 16)


def _window(rows: slice = slice(13, 15), cols: slice = slice(13, 15)) -> torch.Tensor:
    w = torch.zeros(SHAPE, dtype=torch.bool)
    w[:, rows, cols] = True
    return w


class PatchOracle(nn.Module):
    """Passes unit noise through (eps_theta = x, exact for benign noise at t = T) except on a window, where it
    removes the offset ``mu`` from inputs near it -- what a TrojDiff patch model learns (the offset, not the slope).
    Its explained offset on the window is mu * E[exp(-(v + 0.1 eps - mu)^2 / (2 width^2))]: largest at v = mu."""

    def __init__(self, window: torch.Tensor, mu: float, width: float = 0.3) -> None:
        super().__init__()
        self.register_buffer("window", window)
        self.mu, self.width = mu, width
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):  # noqa: ANN001
        near = torch.exp(-((x - self.mu) ** 2) / (2 * self.width ** 2))
        return torch.where(self.window, x - self.mu * near, x)


@pytest.mark.parametrize("mu", [0.9, -1.3])
def test_probe_finds_the_patch_window_and_its_value(schedule, mu):
    w = _window()
    probe = pp.probe_patch(oracle_denoiser(PatchOracle(w, mu), schedule, SHAPE), seed=0)
    assert torch.equal(probe.window, w)
    # the offset it explains away peaks at v = mu, at mu * E[near] = mu / sqrt(1 + 0.1^2 / width^2) (the gate is soft)
    assert probe.peak_input == pytest.approx(mu, abs=0.03)
    assert probe.value == pytest.approx(mu / (1 + 0.01 / 0.09) ** 0.5, abs=0.02)
    assert probe.explained_offset == pytest.approx(abs(probe.value))
    cand = probe.candidate
    assert torch.equal(cand.r != 0, w) and torch.allclose(cand.r[w], torch.tensor(probe.value))
    assert torch.equal(cand.gamma, torch.where(w, pp.PATCH_GAMMA, 1.0))
    s = probe.summary()
    assert s["window_elements"] == 4 and s["candidate"] and s["window_indices"] == [[0, 13, 13], [0, 13, 14],
                                                                                    [0, 14, 13], [0, 14, 14]]


def test_no_candidate_on_a_model_that_only_denoises_or_reacts_image_wide(schedule):
    plain = pp.probe_patch(oracle_denoiser(PatchOracle(torch.zeros(SHAPE, dtype=torch.bool), 0.9), schedule, SHAPE))
    assert plain.candidate is None and plain.found_by == "search"  # the first look saw nothing; the search read
    assert abs(plain.explained_offset) < 0.02  # nothing either: eps = x explains no offset anywhere
    assert plain.summary()["leading_support"] is None  # no response at all (strict JSON: no NaN)
    unsearched = pp.probe_patch(oracle_denoiser(PatchOracle(torch.zeros(SHAPE, dtype=torch.bool), 0.9), schedule,
                                                SHAPE), search=False)
    assert unsearched.candidate is None and not unsearched.window.any() and unsearched.summary()["value"] is None
    wide = _window(slice(0, 8), slice(0, 8))  # a quarter of the image: not a patch for the first look
    probe = pp.probe_patch(oracle_denoiser(PatchOracle(wide, 0.9), schedule, SHAPE), search=False)
    assert probe.candidate is None and probe.leading_support > pp.MAX_WINDOW_FRACTION * wide.numel()


class PaddedNetOracle(nn.Module):
    """A denoiser shaped like a zero-padded UNet's: it shrinks its noise prediction at the corner pixels (eps = 0.85
    x there: the corners' raw residual spread is over 4x the median's) and adds a small, smooth nonlinear response over the
    whole image. With ``window``, a patch gate: inputs whose window mean is near ``mu`` lose the offset ``mu`` there,
    one shared gate for the whole window (how a trained patch model responds)."""

    def __init__(self, window: torch.Tensor | None = None, mu: float = 0.9, *, gate_width: float = 0.8,
                 shrink_corners: bool = True) -> None:
        super().__init__()
        corners = torch.zeros(SHAPE, dtype=torch.bool)
        if shrink_corners:
            corners[:, [0, 0, -1, -1], [0, -1, 0, -1]] = True
        self.register_buffer("corners", corners)
        self.register_buffer("window", torch.zeros(SHAPE, dtype=torch.bool) if window is None else window)
        self.mu, self.gate_width = mu, gate_width
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):  # noqa: ANN001
        smooth = 0.1 * nn.functional.avg_pool2d(x.square() - 1, 5, stride=1, padding=2, count_include_pad=False)
        out = torch.where(self.corners, 0.85 * x, x) + smooth
        if self.window.any():
            gap = (x[:, self.window] - self.mu).square().mean(1)
            gate = torch.exp(-gap / self.gate_width).view(-1, 1, 1, 1)
            out = out - self.window * self.mu * gate
        return out


def test_window_ignores_corner_shrinkage_and_finds_a_gated_patch(schedule):
    den = oracle_denoiser(PaddedNetOracle(), schedule, SHAPE)
    _, res = pp.residual_response(den, torch.Generator().manual_seed(17))
    spread = res.std(0).view(SHAPE)
    assert spread[0, 0, 0] > 4 * spread.median()  # what the first probe's 4x spread cut took for a window
    benign = pp.probe_patch(den)
    assert benign.candidate is None and benign.found_by == "search" and benign.explained_offset < pp.SEARCH_ACCEPT
    w = _window(slice(12, 15), slice(12, 15))
    probe = pp.probe_patch(oracle_denoiser(PaddedNetOracle(w), schedule, SHAPE))
    assert torch.equal(probe.window, w) and probe.localized_components >= 1
    assert probe.candidate is not None and probe.value == pytest.approx(0.9, abs=0.15)


class CornerPixelOracle(nn.Module):
    """Passes noise through except at one corner pixel, whose prediction bends with its input (a smooth odd
    nonlinearity, no preferred value): the first look's leading component sits on that pixel alone -- what clean
    tiny-photos32-dc models of one base do (bench_photos32dc_wp_heldout's first run read them as patch models)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):  # noqa: ANN001
        out = x.clone()
        out[:, :, 0, 0] = x[:, :, 0, 0] - 0.3 * x[:, :, 0, 0] ** 3 / (1 + x[:, :, 0, 0] ** 2)
        return out


def test_a_one_pixel_response_is_no_patch(schedule):
    den = oracle_denoiser(CornerPixelOracle(), schedule, SHAPE)
    window, support, used = pp.first_look(den, pp.probe_generator(0))
    assert window.view(SHAPE)[0, 0, 0] and window.sum() == 1 and used >= 1  # localized, on the corner pixel
    probe = pp.probe_patch(den)
    assert probe.found_by == "search" and probe.candidate is None and probe.first_look_window == [(0, 0)]
    assert probe.window.sum() >= 4  # the search's boxes are at least 2 x 2
    summary = probe.summary()
    assert probe_features(summary)["L_p"] == 1.0  # before the shape rule: 256 / support, a patch's reading
    assert pp.probe_patch(den, search=False).summary()["first_look_window"] == [[0, 0]]
    with pytest.raises(TerdError, match="at least 1 pixel"):
        pp.probe_patch(den, min_side=0)
    with pytest.raises(TerdError, match="at least one start"):
        pp.probe_patch(den, search_starts=0)


def test_peak_is_the_parabola_vertex_inside_the_grid():
    grid = tuple(0.5 + 0.05 * k for k in range(9))
    assert pp._peak(grid, [0.7 - (v - 0.62) ** 2 for v in grid]) == pytest.approx((0.62, 0.7))
    assert pp._peak(grid, [-(v - 3.0) ** 2 for v in grid]) == pytest.approx((grid[-1], -(grid[-1] - 3) ** 2))  # outside
    assert pp._peak(grid, [(v - 0.65) ** 2 for v in grid]) == (grid[-1], (grid[-1] - 0.65) ** 2)  # convex: best point


def test_control_window_mirrors_away_from_the_window():
    w = _window()  # bottom-right 2 x 2: its left-right mirror misses it
    assert torch.equal(pp.control_window(w), w.flip(-1))
    centre = _window(slice(7, 9), slice(7, 9))  # every mirror lands on it: half an image away instead
    c = pp.control_window(centre)
    assert c.sum() == 4 and not (c & centre).any()


def test_value_is_the_excess_over_a_model_that_explains_every_large_offset(schedule):
    class MeanReader(PatchOracle):  # also removes a share of any large offset, everywhere (like a dc model)
        def forward(self, x, t):  # noqa: ANN001
            return super().forward(x, t) - 0.3 * torch.relu(x.abs() - 1.0) * x.sign()

    w = _window()
    probe = pp.probe_patch(oracle_denoiser(MeanReader(w, 0.9), schedule, SHAPE))
    assert torch.equal(probe.window, w) and probe.value == pytest.approx(0.9 / (1 + 0.01 / 0.09) ** 0.5, abs=0.03)


def test_reversion_hands_the_patch_candidate_to_input_detection_only(schedule):
    w, mu = _window(), 0.9
    den = oracle_denoiser(PatchOracle(w, mu), schedule, SHAPE)
    cfg = ReversionConfig(stage1_iters=2, stage2_iters=1, batch_size=2, ddim_steps=2)
    res = reverse_trigger(den, cfg, seed=0)
    assert res.patch_candidate is not None and res.input_candidates[-1] is res.patch_candidate
    assert len(res.input_candidates) == len(res.candidate_triggers) + 1 == len(res.candidates) + 1
    assert res.patch_probe["candidate"] and res.probe_evaluations > 0
    g = torch.Generator().manual_seed(5)
    backdoor = torch.where(w, mu + 0.1 * torch.randn((2000, *SHAPE), generator=g), torch.randn((2000, *SHAPE), generator=g))
    det = CandidateSetDetector(res.input_candidates, fpr=1e-3)
    assert det.is_backdoor(backdoor).double().mean() > 0.9  # the soft gate's value is 0.95 mu: a 2 x 2 patch loses some
    off = reverse_trigger(den, ReversionConfig(stage1_iters=2, stage2_iters=1, batch_size=2, ddim_steps=2,
                                               patch_probe=False), seed=0)
    assert off.patch_candidate is None and off.patch_probe is None and off.probe_evaluations == 0
    assert off.network_evaluations == res.network_evaluations  # the probe's cost is counted apart


def test_scan_report_and_candidates_file_carry_the_patch_candidate(schedule, tmp_path, monkeypatch):
    from terd.defense import reversion as rev
    from terd.defense.scan import scan_model
    from terd.defense.trigger import load_candidates

    monkeypatch.setitem(rev.PRESETS, "fast", ReversionConfig(name="fast", stage1_iters=2, stage2_iters=1,
                                                             batch_size=2, ddim_steps=2))
    w = _window()
    rep = scan_model(oracle_denoiser(PatchOracle(w, 0.9), schedule, SHAPE), tmp_path / "scan", samples=0)
    probe = rep["patch_probe"]
    assert probe["candidate"] and probe["candidate_index"] == len(rep["candidates"])
    cands = load_candidates(tmp_path / "scan" / rep["candidates_file"])
    assert len(cands) == len(rep["candidates"]) + 1 and torch.equal(cands[-1].r != 0, w)
    assert rep["network_evaluations"] == sum(rep["network_evaluations_detail"].values())


@pytest.mark.parametrize("seed", [0, 1])
def test_localization_is_high_on_a_patch_response_and_about_3_on_an_image_wide_one(schedule, seed):
    """L_p = elements / effective support of the leading response component. A response confined to a 2 x 2 patch
    puts that component on at most 4 elements (L_p >= 256 / 4); independent responses everywhere leave a near-random
    direction in 256 dimensions, whose effective support 1 / sum v^4 is about d / 3 (L_p about 3)."""
    from terd.defense.model_detection import localization

    patch = pp.probe_patch(oracle_denoiser(PatchOracle(_window(), 0.9), schedule, SHAPE), seed=seed)
    wide = pp.probe_patch(oracle_denoiser(PatchOracle(torch.ones(SHAPE, dtype=torch.bool), 0.9), schedule, SHAPE), seed=seed)
    assert localization(patch.leading_support, 256) >= 64
    assert 1.5 < localization(wide.leading_support, 256) < 6
    assert localization(None, 256) is None and localization(0.0, 256) is None  # no response: no feature


def test_reversion_reports_L_p_from_the_probe_summary_and_none_without_a_response(schedule):
    cfg = ReversionConfig(stage1_iters=2, stage2_iters=1, batch_size=2, ddim_steps=2)
    res = reverse_trigger(oracle_denoiser(PatchOracle(_window(), 0.9), schedule, SHAPE), cfg, seed=0)
    assert res.patch_probe["elements"] == 256
    assert res.features["L_p"] == pytest.approx(256 / res.patch_probe["leading_support"]) and res.features["L_p"] >= 64
    assert res.features["W_p"] == res.patch_probe["explained_offset"] > 0.8  # the offset it removes on the window
    assert probe_features(res.patch_probe) == {"L_p": res.features["L_p"], "W_p": res.features["W_p"]}  # as the bench
    plain = reverse_trigger(oracle_denoiser(PatchOracle(torch.zeros(SHAPE, dtype=torch.bool), 0.9), schedule, SHAPE),
                            cfg, seed=0)
    assert "L_p" not in plain.features and set(plain.features) == {"M_r", "V_r", "P_r", "W_p"}  # no response; the
    assert abs(plain.features["W_p"]) < 0.02  # search's window reads nothing
    off = reverse_trigger(oracle_denoiser(PatchOracle(_window(), 0.9), schedule, SHAPE),
                          ReversionConfig(stage1_iters=2, stage2_iters=1, batch_size=2, ddim_steps=2, patch_probe=False), seed=0)
    assert "L_p" not in off.features and "W_p" not in off.features
    assert probe_features({"leading_support": 3.0}) == {}  # a summary recorded before `elements`: see bench


def whole_patch_oracle(window: torch.Tensor | None = None, mu: float = 0.9) -> PaddedNetOracle:
    """A larger patch whose gate needs the whole window near ``mu`` (width 0.1 in mean squared gap): benign noise
    never opens it, so the model's response to noise is only the smooth image-wide part and the first look finds
    no window -- how the 3 x 3 digits16 and 6 x 6 dc patch models behave (bench_digits16_patch_shapes)."""
    return PaddedNetOracle(window, mu, gate_width=0.1, shrink_corners=False)


@pytest.mark.parametrize(("rows", "cols", "mu"), [(slice(5, 8), slice(9, 12), 0.9), (slice(12, 16), slice(0, 3), -0.6)])
def test_search_finds_a_patch_the_first_look_misses(schedule, rows, cols, mu):

    w = _window(rows, cols)  # off the coarse squares' grid, and one flush with two borders
    den = oracle_denoiser(whole_patch_oracle(w, mu), schedule, SHAPE)
    assert not pp.first_look(den, pp.probe_generator(0))[0].any()  # no localized response to benign noise
    probe = pp.probe_patch(den)
    assert probe.found_by == "search" and torch.equal(probe.window, w)
    # at v = mu the gap is 0.01 E[eps^2]: the gate is exp(-0.1), so the explained offset is mu exp(-0.1)
    assert probe.peak_input == pytest.approx(mu, abs=0.06) and probe.value == pytest.approx(mu * 0.905, abs=0.03)
    assert probe.candidate is not None and torch.equal(probe.candidate.r != 0, w)
    assert probe_features(probe.summary())["W_p"] == probe.explained_offset >= pp.SEARCH_ACCEPT
    box = probe.summary()["window_box"]
    assert box == [rows.start, rows.stop - 1, cols.start, cols.stop - 1] and probe.summary()["search_excess"] > 0.5


def test_search_window_on_a_clean_model_is_no_candidate(schedule):
    probe = pp.probe_patch(oracle_denoiser(whole_patch_oracle(), schedule, SHAPE))
    assert probe.found_by == "search" and probe.candidate is None and probe.explained_offset < 0.05


def test_coarse_boxes_cover_the_image_symmetrically_and_neighbours_stay_inside():
    for h, w in ((16, 16), (32, 32), (20, 28)):
        boxes = pp.coarse_boxes(h, w)
        size = max(2, min(h, w) // 4)
        assert all(b[1] - b[0] == b[3] - b[2] == size for b in boxes)
        covered = torch.zeros(h, w, dtype=torch.bool)
        for b in boxes:
            covered[b[0]:b[1], b[2]:b[3]] = True
        assert covered.all()
        assert {(h - b[1], h - b[0], w - b[3], w - b[2]) for b in boxes} == set(boxes)  # mirrors of each other
    assert pp._neighbours((0, 2, 14, 16), 16, 16, max_area=4, min_side=1) == [
        (1, 2, 14, 16), (0, 1, 14, 16), (0, 2, 15, 16), (0, 2, 14, 15)]  # shrinking only
    assert set(pp._neighbours((0, 2, 14, 16), 16, 16, max_area=16, min_side=1)) == {
        (1, 2, 14, 16), (0, 1, 14, 16), (0, 3, 14, 16), (0, 2, 13, 16), (0, 2, 15, 16), (0, 2, 14, 15)}
    # a patch is at least 2 x 2 (the default): a 2 x 2 box can only grow, and not past the area bound
    assert pp._neighbours((0, 2, 14, 16), 16, 16, max_area=4) == []
    assert set(pp._neighbours((0, 2, 14, 16), 16, 16, max_area=16)) == {(0, 3, 14, 16), (0, 2, 13, 16)}


def test_start_squares_are_the_best_that_do_not_overlap_a_better_one():
    boxes = [(0, 8, 0, 8), (0, 8, 4, 12), (8, 16, 8, 16), (0, 8, 8, 16), (4, 12, 4, 12)]
    scores = [0.5, 0.45, 0.3, 0.2, 0.6]
    # (4,12,4,12) best; (0,8,0,8) and (0,8,4,12) overlap it; (8,16,8,16) too; (0,8,8,16) does too (rows 4-7, cols 8-11)
    assert pp.start_squares(boxes, scores, 3) == [(4, 12, 4, 12)]
    assert pp.start_squares(boxes[:4], scores[:4], 3) == [(0, 8, 0, 8), (8, 16, 8, 16), (0, 8, 8, 16)]
    assert pp.start_squares(boxes[:4], scores[:4], 1) == [(0, 8, 0, 8)]


class _Landscape:
    """A stand-in for the search's scorer: a 6 x 6 patch of excess ``mu`` at rows/cols 26-31 of a 32 x 32 image,
    diluted by the area of a box that holds it and lost by one that cuts into it, and a clean model's drift of 0.2
    on the central square, diluted likewise -- the dc base of seed 5 (window_search.md)."""

    def __init__(self, den, generator, mu: float = 0.3) -> None:  # noqa: ANN001
        self.shape, self.mu = den.image_shape, mu

    def __call__(self, boxes):  # noqa: ANN001, ANN204
        def score(b):  # noqa: ANN001, ANN202
            area = (b[1] - b[0]) * (b[3] - b[2])
            holds = b[0] <= 26 and b[1] >= 32 and b[2] <= 26 and b[3] >= 32
            centre = max(0, min(b[1], 20) - max(b[0], 12)) * max(0, min(b[3], 20) - max(b[2], 12))
            return max(self.mu * 36 / area if holds else 0.0, 0.2 * centre / area)
        return [(score(b), 0.6) for b in boxes]


@pytest.mark.parametrize(("starts", "found"), [(1, None), (3, (26, 32, 26, 32))])
def test_search_climbs_from_several_squares_past_a_central_drift(monkeypatch, starts, found):
    """The patch's coarse square (0.3 x 36 / 64 = 0.17) scores under the drift's (0.2), yet climbs to the patch
    (0.3): from the best square alone the search stays on the drift."""
    monkeypatch.setattr(pp, "_ExcessOfBoxes", _Landscape)
    den = type("Den", (), {"image_shape": (1, 32, 32)})()
    window, score, at, climbs = pp.search_window(den, torch.Generator(), starts=starts)
    if found is None:
        assert score == 0.2 and len(climbs) == 1 and climbs[0]["end"] == [12, 20, 12, 20]
    else:
        assert torch.equal(window, pp.box_window((1, 32, 32), found)) and score == pytest.approx(0.3)
        assert len(climbs) == 3 and climbs[0]["start_excess"] == 0.2 and climbs[1]["start"] == [24, 32, 24, 32]
        assert climbs[1]["start_excess"] == round(0.3 * 36 / 64, 4) and climbs[1]["end"] == list(found)


@pytest.mark.parametrize(("pixels", "window_elements", "shaped"), [
    ([(14, 14), (14, 15), (15, 14), (15, 15)], 4, True),  # TrojDiff's 2 x 2 at 16 px
    ([(r, c) for r in range(13, 16) for c in range(13, 16) if (r, c) != (13, 13)], 8, True),  # one pixel missed
    ([(0, 0)], 1, False),  # one corner pixel (the clean dc models of seed 5)
    ([(0, 0), (15, 0)], 2, False),  # two corners: a 16 x 1 box, two of its pixels
    ([(3, 4), (3, 5), (3, 6)], 3, False),  # a line, not an area
    ([(0, 0), (0, 1), (1, 0), (2, 2)], 4, False),  # 4 of a 3 x 3 box
    ([(r, c) for r in range(4) for c in range(4)], 16, False),  # over 5% of 256 elements
])
def test_a_patch_window_is_a_filled_area(pixels, window_elements, shaped):
    assert pp.patch_shaped(pixels, 256, window_elements) is shaped
    window = torch.zeros(1, 16, 16, dtype=torch.bool)
    for r, c in pixels:
        window[0, r, c] = True
    assert pp.is_patch_shaped(window) is shaped
    assert pp.patch_shaped(pixels[:1], 256, 1, min_side=1)  # a one-pixel patch only when asked for


def test_localization_reads_a_patch_shaped_first_look_only():
    """L_p from a summary: the leading component's localization when the first look kept a patch-shaped window,
    1 when it did not (the corner pixels of clean dc models), None without a response; summaries recorded before
    the shape rule are judged by the window they list."""
    new = {"elements": 3072, "leading_support": 40.0, "first_look_window": None}
    assert probe_features({**new, "found_by": "first look", "explained_offset": 0.9}) == {"L_p": 76.8, "W_p": 0.9}
    assert probe_features({**new, "found_by": "search", "first_look_window": [[0, 0]], "explained_offset": 0.1}) == {
        "L_p": 1.0, "W_p": 0.1}
    assert probe_features({**new, "leading_support": None, "found_by": "search"}) == {}
    old = {"elements": 256, "leading_support": 10.0, "found_by": "first look", "window_elements": 4}
    assert pp.first_look_found_patch({**old, "window_indices": [[0, 14, 14], [0, 14, 15], [0, 15, 14], [0, 15, 15]]})
    assert not pp.first_look_found_patch({**old, "window_elements": 2, "window_indices": [[0, 0, 0], [0, 15, 0]]})
    assert not pp.first_look_found_patch({**old, "window_indices": [[0, 14, 14]]})  # not fully listed
