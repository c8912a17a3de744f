"""Small-patch triggers: find the patch from the model's own response, then read its value from what it explains away.

Why a separate probe: TERD's two-noise loss cancels every constant offset, and a constant offset is exactly what a
TrojDiff patch model learns on its patch -- it removes the patch's mean from its noise prediction but never learns
the steep noise slope a perfect fit would need (loss_bands.md: at no timestep does it predict the unit noise under
the patch). So no reversion candidate lands on a patch, and input detection missed the 2x2 patch's inputs (TPR
0.0001). Two forward-only looks at t = T - 1 find it (benchmarks/results/patch_probe.md):

1. **window**: over benign unit noises x, the residual eps_theta(x) - x is small and alike at every pixel of a model
   that only denoises; where a model was poisoned it reacts to the values it was trained to treat specially, and the
   residual's spread stands out. The window is the elements whose spread exceeds ``RATIO_CUT`` times the median
   element's. No window, or one larger than ``MAX_WINDOW_FRACTION`` of the image (not a patch), means no candidate.
2. **value**: the window is set to v + ``PATCH_GAMMA`` * eps (the rest benign noise) for v on a grid. A model that
   only denoises predicts the window's offset as noise; one trained on a trigger of mean mu there removes it. The
   explained offset v - mean_window eps_theta, taken in the direction of v, peaks near mu (a coarse, then a fine
   grid).

The candidate N(v on the window with gamma ``PATCH_GAMMA``; N(0, 1) elsewhere) joins the scan's input-detection
candidate set. It is NOT part of the model-detection features, which are calibrated on the reversion's candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from terd.defense.trigger import Trigger

RATIO_CUT = 4.0  # spread / median spread that marks a window element (digits16 benign: max 1.73-2.24; patch: 7.9-10.4)
MAX_WINDOW_FRACTION = 0.05  # a larger window is not a patch (the reversion covers image-wide triggers)
PATCH_GAMMA = 0.1  # the window's noise scale while its value is searched, and the candidate's (TrojDiff's patch gamma)
RESPONSE_NOISES = 512  # benign noises for the residual spread
VALUE_NOISES = 64  # noises per coarse grid value
FINE_NOISES = 128  # noises per fine grid value (the peak is flat: its top 0.1 wide varies by ~0.02)
COARSE_GRID = tuple(i / 5 for i in range(-15, 16))  # -3 .. 3 in steps of 0.2 (unit-noise units) ...
FINE_STEP = 0.05  # ... then steps of 0.05 within 0.2 of the coarse best, and the vertex of a parabola fitted there
_CHUNK = 256  # images per network call


@dataclass
class PatchProbe:
    """What the probe saw: the window (bool, C x H x W), its value and the candidate (None without a window)."""

    window: torch.Tensor
    ratio_max: float
    value: float | None
    explained_offset: float | None
    candidate: Trigger | None

    def summary(self) -> dict:
        return {"window_elements": int(self.window.sum()), "ratio_max": round(self.ratio_max, 3),
                "ratio_cut": RATIO_CUT, "value": self.value, "explained_offset": self.explained_offset,
                "gamma": PATCH_GAMMA if self.candidate is not None else None,
                "candidate": self.candidate is not None,
                "window_indices": [list(map(int, i)) for i in self.window.nonzero().tolist()][:64]}


def _at_last_t(den, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return den(x, torch.full((x.shape[0],), den.num_timesteps - 1, device=x.device))


def response_spread(den, generator: torch.Generator, n: int = RESPONSE_NOISES) -> torch.Tensor:  # noqa: ANN001
    """Per-element std of eps_theta(x, T-1) - x over ``n`` benign unit noises x (C x H x W)."""
    res = []
    for start in range(0, n, _CHUNK):
        x = torch.randn((min(_CHUNK, n - start), *den.image_shape), generator=generator).to(den.device)
        res.append((_at_last_t(den, x) - x).cpu())
    return torch.cat(res).std(0)


def explained_offsets(den, window: torch.Tensor, generator: torch.Generator,  # noqa: ANN001
                      grid: tuple[float, ...], n: int = VALUE_NOISES) -> list[float]:
    """For each v in ``grid``: v - mean over the window of eps_theta(x, T-1), with x = v + PATCH_GAMMA * eps on the
    window and benign unit noise elsewhere (the same draws for every v)."""
    dev = den.device
    x = torch.randn((n, *den.image_shape), generator=generator).to(dev)
    e = torch.randn((n, *den.image_shape), generator=generator).to(dev)
    w = window.to(dev)
    per_call = max(1, _CHUNK // n)
    out: list[float] = []
    for i in range(0, len(grid), per_call):
        vs = torch.tensor(grid[i:i + per_call], dtype=x.dtype, device=dev)
        xv = torch.where(w, vs.view(-1, 1, 1, 1, 1) + PATCH_GAMMA * e, x).flatten(0, 1)
        f = _at_last_t(den, xv).view(len(vs), n, *den.image_shape)
        out += (vs - f[:, :, w].mean(dim=(1, 2))).tolist()
    return out


def _toward_offset(grid: tuple[float, ...], offsets: list[float]) -> list[float]:
    """The explained offset in the direction of the input's offset (a dark patch is explained by a negative one)."""
    return [o if v >= 0 else -o for v, o in zip(grid, offsets, strict=True)]


def _peak(grid: tuple[float, ...], values: list[float]) -> float:
    """The vertex of the least-squares parabola through (grid, values), kept inside the grid; the best grid point
    when the fit is not concave."""
    v, y = torch.tensor(grid, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    a, b, _ = torch.linalg.lstsq(torch.stack([v * v, v, torch.ones_like(v)], 1), y[:, None]).solution[:, 0].tolist()
    if a >= 0:
        return grid[max(range(len(grid)), key=values.__getitem__)]
    return min(max(-b / (2 * a), grid[0]), grid[-1])


@torch.no_grad()
def probe_patch(den, seed: int = 0) -> PatchProbe:  # noqa: ANN001
    """Look for a small patch trigger (see the module docstring); forward passes only."""
    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    spread = response_spread(den, gen)
    ratio = spread / spread.median().clamp_min(1e-12)
    window = ratio > RATIO_CUT
    ratio_max = float(ratio.max())
    if not window.any() or window.sum() > MAX_WINDOW_FRACTION * window.numel():
        return PatchProbe(window, ratio_max, None, None, None)
    coarse = _toward_offset(COARSE_GRID, explained_offsets(den, window, gen, COARSE_GRID))
    top = COARSE_GRID[max(range(len(coarse)), key=coarse.__getitem__)]
    fine_grid = tuple(round(top + FINE_STEP * k, 4) for k in range(-4, 5))
    value = round(_peak(fine_grid, _toward_offset(fine_grid, explained_offsets(den, window, gen, fine_grid,
                                                                               n=FINE_NOISES))), 4)
    offset = explained_offsets(den, window, gen, (value,), n=FINE_NOISES)[0]
    candidate = Trigger(window * value, torch.where(window, PATCH_GAMMA, 1.0),
                        meta={"start": "patch-probe", "gamma_init": PATCH_GAMMA})
    return PatchProbe(window, ratio_max, value, round(offset, 4), candidate)
