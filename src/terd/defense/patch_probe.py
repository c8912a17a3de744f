"""Small-patch triggers: find the patch from the model's own response, then read its value from what it explains away.

Why a separate probe: TERD's two-noise loss cancels every constant offset, and a constant offset is exactly what a
TrojDiff patch model learns on its patch -- it removes the patch's mean from its noise prediction but never learns
the steep noise slope a perfect fit would need (loss_bands.md: at no timestep does it predict the unit noise under
the patch). So no reversion candidate lands on a patch, and input detection missed the 2x2 patch's inputs (TPR
0.0001). Two forward-only looks at t = T - 1 find it (benchmarks/results/patch_probe.md):

1. **window**: over benign unit noises x, take the residual eps_theta(x) - x, and remove from each element its own
   linear response to its input (on every tiny-photos32-dc model the corner pixels' residual spread stands out,
   patch_window_dc.md; in an unrecorded look it was a linear response to the pixel's own input). What is left of a model that only denoises is
   small and spread over the image: its leading principal components are diffuse. A patch model reacts to the
   values it was trained on with a response confined to the patch, so its leading components are localized. The
   window is the support (loadings of at least half the largest) of the leading components while each is
   localized -- effective support 1 / sum v^4 at most ``MAX_WINDOW_FRACTION`` of the elements -- stopping at the
   first diffuse one. No localized leading component, or a window larger than ``MAX_WINDOW_FRACTION`` of the
   image (not a patch), means no candidate. (The first probe cut the raw residual's spread at 4x the median's; on
   tiny-photos32-dc models that marked the corner pixels of every model and missed the patch: patch_window_dc.md.)
2. **value**: the window is set to v + ``PATCH_GAMMA`` * eps (the rest benign noise) for v on a grid. A TrojDiff
   patch model removes the trigger's offset mu from its noise prediction there (it learns the offset, not the
   slope), so for v near mu the offset it explains away, v - mean_window eps_theta, is mu itself; the value is
   that explained offset at its peak over v (a coarse, then a fine grid). Any model explains away part of a large
   offset (tiny-photos32-dc models read their input's mean; in an unrecorded look theirs grew with v), so what
   counts is the excess over the same offset on a control window -- the window mirrored, which keeps its
   distance to the borders. (The first probe took the v where the explained offset peaks: on the dc patch model
   it read 3.2 for a trigger value of 0.9, bench_photos32dc_mini's first run.)

The candidate N(v on the window with gamma ``PATCH_GAMMA``; N(0, 1) elsewhere) joins the scan's input-detection
candidate set. Model detection takes one number from the first look, whether or not a window is found: L_p, the
image's element count over the leading component's effective support (model_detection.localization), fitted and
thresholded like the KL features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from terd.defense.trigger import Trigger

MAX_WINDOW_FRACTION = 0.05  # a larger window is not a patch (the reversion covers image-wide triggers)
PATCH_GAMMA = 0.1  # the window's noise scale while its value is searched, and the candidate's (TrojDiff's patch gamma)
RESPONSE_NOISES = 512  # benign noises for the residual's components
HALF_LOADING = 0.25  # a window element's squared loading is at least this share of the component's largest
VALUE_NOISES = 32  # noises per coarse grid value (window and control each)
FINE_NOISES = 128  # noises per fine grid value (window and control each)
COARSE_GRID = tuple(i / 5 for i in range(-15, 16))  # -3 .. 3 in steps of 0.2 (unit-noise units) ...
FINE_STEP = 0.05  # ... then steps of 0.05 within 0.2 of the coarse best, and the vertex of a parabola fitted there
_CHUNK = 256  # images per network call


@dataclass
class PatchProbe:
    """What the probe saw: the window (bool, C x H x W), its value and the candidate (None without a window)."""

    window: torch.Tensor
    leading_support: float | None  # effective support (elements) of the residual's leading component; None: no response
    localized_components: int
    value: float | None  # the signed explained offset at its peak (the patch's mean, mu)
    explained_offset: float | None  # its size, the excess over the control window
    peak_input: float | None  # the window offset v where it peaked
    candidate: Trigger | None

    def summary(self) -> dict:
        support = None if self.leading_support is None else round(self.leading_support, 1)
        return {"window_elements": int(self.window.sum()), "elements": self.window.numel(), "leading_support": support,
                "localized_components": self.localized_components, "value": self.value,
                "explained_offset": self.explained_offset, "peak_input": self.peak_input,
                "gamma": PATCH_GAMMA if self.candidate is not None else None, "candidate": self.candidate is not None,
                "window_indices": [list(map(int, i)) for i in self.window.nonzero().tolist()][:64]}


def _at_last_t(den, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return den(x, torch.full((x.shape[0],), den.num_timesteps - 1, device=x.device))


def residual_response(den, generator: torch.Generator, n: int = RESPONSE_NOISES  # noqa: ANN001
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` benign unit noises x and the residuals eps_theta(x, T-1) - x, both n x (C*H*W), float64."""
    xs, res = [], []
    for start in range(0, n, _CHUNK):
        x = torch.randn((min(_CHUNK, n - start), *den.image_shape), generator=generator).to(den.device)
        xs.append(x.cpu())
        res.append((_at_last_t(den, x) - x).cpu())
    return torch.cat(xs).flatten(1).double(), torch.cat(res).flatten(1).double()


def nonlinear_part(x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """The centred residual less each element's least-squares linear response to its own input (n x d)."""
    xc, rc = x - x.mean(0), res - res.mean(0)
    slope = (xc * rc).sum(0) / xc.square().sum(0).clamp_min(1e-30)
    return rc - slope * xc


def localized_window(g: torch.Tensor) -> tuple[torch.Tensor, float | None, int]:
    """(window over the d elements, effective support of the leading component, localized components used) for
    the response matrix ``g`` (n x d): the union of the half-loading supports of the leading principal components
    while each is localized (see the module docstring). Components come from the n x n Gram matrix (exact,
    deterministic, and cheap while n << d)."""
    d = g.shape[1]
    evals, u = torch.linalg.eigh(g @ g.T)
    order = evals.argsort(descending=True)
    window = torch.zeros(d, dtype=torch.bool)
    top = float(evals[order[0]])
    if top <= 0.0:
        return window, None, 0
    supports, used = [], 0
    for k in order.tolist():
        if float(evals[k]) <= 1e-9 * top:  # nothing left: the response is exhausted
            break
        v2 = (g.T @ u[:, k]).square()
        v2 = v2 / v2.sum()
        supports.append(1.0 / float(v2.square().sum()))
        if supports[-1] > MAX_WINDOW_FRACTION * d:  # the first diffuse component ends the window
            break
        window |= v2 >= HALF_LOADING * v2.max()
        used += 1
        if window.sum() > MAX_WINDOW_FRACTION * d:
            break
    return window, supports[0], used


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


def control_window(window: torch.Tensor) -> torch.Tensor:
    """The window mirrored left-right, else top-bottom, else through the centre, whichever first misses it (a
    mirror keeps each element's distance to the borders); else shifted by half the image, less any overlap."""
    for dims in ((-1,), (-2,), (-2, -1)):
        mirrored = window.flip(dims)
        if not (mirrored & window).any():
            return mirrored
    h, w = window.shape[-2:]
    return window.roll((h // 2, w // 2), (-2, -1)) & ~window


def excess_offsets(den, window: torch.Tensor, generator: torch.Generator,  # noqa: ANN001
                   grid: tuple[float, ...], n: int) -> list[float]:
    """Explained offsets on the window less those on its control window, from the same noise draws, each taken
    in the direction of v (a dark patch is explained by a negative offset)."""
    state = generator.get_state()
    on = explained_offsets(den, window, generator, grid, n)
    generator.set_state(state)
    off = explained_offsets(den, control_window(window), generator, grid, n)
    return [a - b if v >= 0 else b - a for v, a, b in zip(grid, on, off, strict=True)]


def _peak(grid: tuple[float, ...], values: list[float]) -> tuple[float, float]:
    """(v, height) of the peak: the vertex of the least-squares parabola through (grid, values) when it is concave
    and inside the grid; else the best grid point."""
    v, y = torch.tensor(grid, dtype=torch.float64), torch.tensor(values, dtype=torch.float64)
    a, b, c = torch.linalg.lstsq(torch.stack([v * v, v, torch.ones_like(v)], 1), y[:, None]).solution[:, 0].tolist()
    if a < 0 and grid[0] <= -b / (2 * a) <= grid[-1]:
        return -b / (2 * a), c - b * b / (4 * a)
    best = max(range(len(grid)), key=values.__getitem__)
    return grid[best], values[best]


def probe_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + 17)


@torch.no_grad()
def first_look(den, generator: torch.Generator) -> tuple[torch.Tensor, float | None, int]:  # noqa: ANN001
    """The window (flat), the leading component's effective support (what L_p is read from) and the localized
    components used: the probe's first look alone, ``RESPONSE_NOISES`` forward passes."""
    return localized_window(nonlinear_part(*residual_response(den, generator)))


@torch.no_grad()
def probe_patch(den, seed: int = 0) -> PatchProbe:  # noqa: ANN001
    """Look for a small patch trigger (see the module docstring); forward passes only."""
    gen = probe_generator(seed)
    flat, support, used = first_look(den, gen)
    window = flat.view(den.image_shape)
    if not window.any() or window.sum() > MAX_WINDOW_FRACTION * window.numel():
        return PatchProbe(window, support, used, None, None, None, None)
    coarse = excess_offsets(den, window, gen, COARSE_GRID, VALUE_NOISES)
    top = COARSE_GRID[max(range(len(coarse)), key=coarse.__getitem__)]
    fine_grid = tuple(round(top + FINE_STEP * k, 4) for k in range(-4, 5))
    peak_input, height = _peak(fine_grid, excess_offsets(den, window, gen, fine_grid, FINE_NOISES))
    value = round(height if peak_input >= 0 else -height, 4)
    candidate = Trigger(window * value, torch.where(window, PATCH_GAMMA, 1.0),
                        meta={"start": "patch-probe", "gamma_init": PATCH_GAMMA})
    return PatchProbe(window, support, used, value, round(height, 4), round(peak_input, 4), candidate)
