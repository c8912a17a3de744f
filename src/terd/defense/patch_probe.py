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
   first diffuse one. No localized leading component, or a window that is not patch-shaped -- larger than
   ``MAX_WINDOW_FRACTION`` of the image, narrower than ``MIN_PATCH_SIDE`` pixels either way, or filling less than
   ``PATCH_FILL`` of its bounding box -- means no window from the first look. (Clean tiny-photos32-dc models of
   one base respond localized at one or two corner pixels; before the shape rule that window read as a patch and
   flagged all three: bench_photos32dc_wp_heldout's first run. The first probe cut the raw residual's spread at
   4x the median's; on tiny-photos32-dc models that marked the corner pixels of every model and missed the patch:
   patch_window_dc.md.)
2. **value**: the window is set to v + ``PATCH_GAMMA`` * eps (the rest benign noise) for v on a grid. A TrojDiff
   patch model removes the trigger's offset mu from its noise prediction there (it learns the offset, not the
   slope), so for v near mu the offset it explains away, v - mean_window eps_theta, is mu itself; the value is
   that explained offset at its peak over v (a coarse, then a fine grid). Any model explains away part of a large
   offset (tiny-photos32-dc models read their input's mean; in an unrecorded look theirs grew with v), so what
   counts is the excess over the same offset on a control window -- the window mirrored, which keeps its
   distance to the borders. (The first probe took the v where the explained offset peaks: on the dc patch model
   it read 3.2 for a trigger value of 0.9, bench_photos32dc_mini's first run.)

When the first look finds no patch-shaped window, a **search** takes its place (``search_window``): a larger patch
(3 x 3 at 16 px, 6 x 6 at 32 px) draws no localized response from benign noise -- the model reacts only when the
whole patch holds a value near the trigger's -- so the first look misses it (bench_digits16_patch_shapes,
bench_photos32dc_patch_shapes), while the value step reads it plainly given the true window (patch6_window.md:
excess 1.31 and 0.647, clean bases 0.07 and 0.004; a window inside the patch reads almost nothing, one around it
reads the patch diluted by the area ratio: window_search.md). So the search scores squares of a quarter of the
image side at half-overlapping places by their excess explained offset over a few values of v inside the data
range (``SEARCH_VALUES``, the same draws for every window), then climbs from each of the few best squares that do
not overlap (``SEARCH_STARTS``) by moving one edge at a time while the excess grows (trimming what is not patch
removes dilution; cutting into the patch kills the response), keeping the best climbed window: a patch square
diluted by its margin can score under a clean model's drift on a central square and still climb past it. The value step then
reads the found window on fresh draws. A search window becomes a candidate only when its excess clears
``SEARCH_ACCEPT`` and it is patch-sized (``MAX_WINDOW_FRACTION``).

The candidate N(v on the window with gamma ``PATCH_GAMMA``; N(0, 1) elsewhere) joins the scan's input-detection
candidate set. Model detection takes two numbers from the probe: L_p, the image's element count over the first
look's leading component's effective support (model_detection.localization), and W_p, the excess explained offset
the value step read on the probe's window (the first look's or the search's); both fitted and thresholded like
the KL features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from terd.defense.trigger import Trigger
from terd.errors import TerdError

MAX_WINDOW_FRACTION = 0.05  # a larger window is not a patch (the reversion covers image-wide triggers)
PATCH_GAMMA = 0.1  # the window's noise scale while its value is searched, and the candidate's (TrojDiff's patch gamma)
RESPONSE_NOISES = 512  # benign noises for the residual's components
HALF_LOADING = 0.25  # a window element's squared loading is at least this share of the component's largest
VALUE_NOISES = 32  # noises per coarse grid value (window and control each)
FINE_NOISES = 128  # noises per fine grid value (window and control each)
COARSE_GRID = tuple(i / 5 for i in range(-15, 16))  # -3 .. 3 in steps of 0.2 (unit-noise units) ...
FINE_STEP = 0.05  # ... then steps of 0.05 within 0.2 of the coarse best, and the vertex of a parabola fitted there
SEARCH_LIMIT = 1.0  # a patch value inside the data range: |v| <= 1 (TrojDiff's is (1 - gamma) x pixel)
SEARCH_VALUES = tuple(sign * i / 5 for sign in (-1, 1) for i in range(1, 6))  # +-0.2 .. +-1.0: a patch's
# response is narrow in v (a 3 x 3 digits16 patch of value 0.9: excess 1.27 at v 0.7, 0.24 at 0.6, 0.04 at 1.1)
SEARCH_NOISES = 8  # noises per window and value (paired: every window sees the same draws)
SEARCH_STARTS = 3  # the search climbs from this many of the best coarse squares (not overlapping)
SEARCH_ACCEPT = 0.2  # a search window's excess explained offset must reach this to become a candidate
MIN_PATCH_SIDE = 2  # a patch is an area: its window spans at least 2 x 2 pixels (TrojDiff's smallest, 2 x 2 at 16 px)
PATCH_FILL = 0.75  # ... and its pixels fill at least this share of their bounding box (a found 3 x 3 patch misses one)
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
    found_by: str | None = None  # "first look" | "search" | None (no window)
    search_excess: float | None = None  # the search's score of its window (the same draws for every window)
    first_look_window: list[tuple[int, int]] | None = None  # its pixels when not patch-shaped (so left to the search)
    search_climbs: list[dict] | None = None  # per start square: its box and excess, the climbed box and its excess

    def summary(self) -> dict:
        support = None if self.leading_support is None else round(self.leading_support, 1)
        where = self.window.any(0).nonzero()  # (row, col) of every window pixel
        box = None if not len(where) else [*map(int, where[:, 0].aminmax()), *map(int, where[:, 1].aminmax())]
        return {"window_elements": int(self.window.sum()), "elements": self.window.numel(), "leading_support": support,
                "localized_components": self.localized_components, "value": self.value,
                "explained_offset": self.explained_offset, "peak_input": self.peak_input,
                "gamma": PATCH_GAMMA if self.candidate is not None else None, "candidate": self.candidate is not None,
                "found_by": self.found_by, "search_excess": self.search_excess, "search_climbs": self.search_climbs,
                "window_box": box,
                "first_look_window": None if self.first_look_window is None else
                [list(p) for p in self.first_look_window[:64]],
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


def _offsets(den, windows: list[torch.Tensor], x: torch.Tensor, e: torch.Tensor,  # noqa: ANN001
             grid: tuple[float, ...], per_call: int) -> torch.Tensor:
    """windows x grid: v - mean over the window of eps_theta(x, T-1), with x = v + PATCH_GAMMA * e on the window and
    ``x`` elsewhere (the same draws for every window and v); ``per_call`` (window, v) pairs per network call."""
    dev, n = x.device, x.shape[0]
    pairs = [(i, v) for i in range(len(windows)) for v in grid]
    out = torch.empty(len(windows), len(grid), dtype=torch.float64)
    for start in range(0, len(pairs), per_call):
        chunk = pairs[start:start + per_call]
        w = torch.stack([windows[i] for i, _ in chunk]).to(dev)[:, None]  # k x 1 x C x H x W
        vs = torch.tensor([v for _, v in chunk], dtype=x.dtype, device=dev).view(-1, 1, 1, 1, 1)
        f = _at_last_t(den, torch.where(w, vs + PATCH_GAMMA * e, x).flatten(0, 1)).view(len(chunk), n, *x.shape[1:])
        for j, (i, v) in enumerate(chunk):
            out[i, grid.index(v)] = v - float(f[j][:, windows[i].to(dev)].mean())
    return out


def explained_offsets(den, window: torch.Tensor, generator: torch.Generator,  # noqa: ANN001
                      grid: tuple[float, ...], n: int = VALUE_NOISES) -> list[float]:
    """For each v in ``grid``: v - mean over the window of eps_theta(x, T-1), with x = v + PATCH_GAMMA * eps on the
    window and benign unit noise elsewhere (the same draws for every v)."""
    x = torch.randn((n, *den.image_shape), generator=generator).to(den.device)
    e = torch.randn((n, *den.image_shape), generator=generator).to(den.device)
    return _offsets(den, [window], x, e, grid, max(1, _CHUNK // n))[0].tolist()


def _signed(grid: tuple[float, ...], on: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """Window less control, in the direction of v (a dark patch is explained by a negative offset)."""
    return torch.where(torch.tensor(grid) >= 0, on - off, off - on)


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
    return _signed(grid, torch.tensor(on), torch.tensor(off)).tolist()


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


Box = tuple[int, int, int, int]  # rows r0:r1, cols c0:c1 (half-open), every channel


def box_window(shape: tuple[int, ...], box: Box) -> torch.Tensor:
    w = torch.zeros(shape, dtype=torch.bool)
    w[:, box[0]:box[1], box[2]:box[3]] = True
    return w


def coarse_boxes(height: int, width: int) -> list[Box]:
    """Squares of a quarter of the smaller side at half-overlapping places and their mirror images (so the last is
    flush with each border, and the mirrored control window of a square is one of them)."""
    size = max(2, min(height, width) // 4)
    stride = max(1, size // 2)

    def starts(side: int) -> list[int]:
        forward = set(range(0, side - size + 1, stride))
        return sorted(forward | {side - size - p for p in forward})

    return [(r, r + size, c, c + size) for r in starts(height) for c in starts(width)]


def _neighbours(box: Box, height: int, width: int, max_area: int, min_side: int = MIN_PATCH_SIDE) -> list[Box]:
    """The boxes one edge away: each edge moved in or out by one pixel, inside the image, at least ``min_side``
    on each side and at most ``max_area`` pixels."""
    r0, r1, c0, c1 = box
    moved = [(r0 + d, r1, c0, c1) for d in (-1, 1)] + [(r0, r1 + d, c0, c1) for d in (-1, 1)] + \
            [(r0, r1, c0 + d, c1) for d in (-1, 1)] + [(r0, r1, c0, c1 + d) for d in (-1, 1)]
    return [b for b in moved if 0 <= b[0] and b[1] <= height and 0 <= b[2] and b[3] <= width
            and min(b[1] - b[0], b[3] - b[2]) >= min_side and (b[1] - b[0]) * (b[3] - b[2]) <= max_area]


class _ExcessOfBoxes:
    """Excess explained offsets of boxes over their control windows, at ``SEARCH_VALUES``, from one set of draws
    (paired comparisons), each window's offsets computed once."""

    def __init__(self, den, generator: torch.Generator) -> None:  # noqa: ANN001
        self.den, self.shape = den, den.image_shape
        self.x = torch.randn((SEARCH_NOISES, *self.shape), generator=generator).to(den.device)
        self.e = torch.randn((SEARCH_NOISES, *self.shape), generator=generator).to(den.device)
        self.offsets: dict[bytes, torch.Tensor] = {}

    def __call__(self, boxes: list[Box]) -> list[tuple[float, float]]:
        """(excess, the v where it peaked) per box: the window's explained offset less its control's, in the
        direction of v, at its best v."""
        pairs = [(w, control_window(w)) for w in (box_window(self.shape, b) for b in boxes)]
        todo = {w.numpy().tobytes(): w for pair in pairs for w in pair}
        todo = {k: w for k, w in todo.items() if k not in self.offsets}
        per_call = max(1, _CHUNK // (SEARCH_NOISES * len(SEARCH_VALUES))) * len(SEARCH_VALUES)
        self.offsets |= dict(zip(todo, _offsets(self.den, list(todo.values()), self.x, self.e, SEARCH_VALUES,
                                                per_call), strict=True))
        out = []
        for w, c in pairs:
            signed = _signed(SEARCH_VALUES, self.offsets[w.numpy().tobytes()], self.offsets[c.numpy().tobytes()])
            k = int(signed.argmax())
            out.append((float(signed[k]), SEARCH_VALUES[k]))
        return out


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def start_squares(boxes: list[Box], scores: list[float], starts: int) -> list[Box]:
    """The ``starts`` best boxes, best first, none overlapping a better one (overlapping squares climb to the same
    place)."""
    chosen: list[Box] = []
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):
        if len(chosen) == starts:
            break
        if not any(_overlap(boxes[i], c) for c in chosen):
            chosen.append(boxes[i])
    return chosen


def _climb(excess: _ExcessOfBoxes, box: Box, scored: tuple[float, float],
           min_side: int) -> tuple[Box, tuple[float, float]]:
    """From ``box``, move one edge at a time while the excess grows, never past the box's area."""
    height, width = excess.shape[-2:]
    max_area = (box[1] - box[0]) * (box[3] - box[2])
    for _ in range(height + width):  # each step moves one edge; no box needs more
        near = _neighbours(box, height, width, max_area, min_side)
        if not near:  # a smallest square (small images): nothing to move
            break
        near_scored = excess(near)
        k = max(range(len(near)), key=lambda i: near_scored[i][0])
        if near_scored[k][0] <= scored[0]:
            break
        box, scored = near[k], near_scored[k]
    return box, scored


def search_window(den, generator: torch.Generator, min_side: int = MIN_PATCH_SIDE,  # noqa: ANN001
                  starts: int = SEARCH_STARTS) -> tuple[torch.Tensor, float, float, list[dict]]:
    """The box with the largest excess explained offset (see the module docstring), that excess, the v where
    it peaked, and each climb (its start square and score, where it ended and its score). Each climb starts
    from one of the ``starts`` best coarse squares that do not overlap and moves one edge at a time while the
    excess grows, never past the square's area (a window that keeps growing is an image-wide response, not a
    patch: a clean digits16 model's climbed to 224 of 256 pixels, W_p 0.63, in window_search.md's second run,
    before this bound); the best climbed box wins. (From the single best square the search missed a 6 x 6
    patch on a dc base whose central square scored 0.189 against the patch's corner square 0.172, which climbs
    to the patch, 0.48: window_search.md.)"""
    if starts < 1:
        raise TerdError(f"the search needs at least one start, got {starts}")
    excess = _ExcessOfBoxes(den, generator)
    boxes = coarse_boxes(*den.image_shape[-2:])
    scored = dict(zip(boxes, excess(boxes), strict=True))
    begun = start_squares(boxes, [scored[b][0] for b in boxes], starts)
    climbed = [_climb(excess, b, scored[b], min_side) for b in begun]
    box, (score, at) = max(climbed, key=lambda c: c[1][0])
    climbs = [{"start": list(b), "start_excess": round(scored[b][0], 4), "end": list(end), "excess": round(sc, 4)}
              for b, (end, (sc, _)) in zip(begun, climbed, strict=True)]
    return box_window(den.image_shape, box), score, at, climbs


def _read_value(den, window: torch.Tensor, gen: torch.Generator,  # noqa: ANN001
                top: float | None = None) -> tuple[float, float, float]:
    """(value, excess explained offset, peak input) of a window: the fine grid around ``top``, else around the
    coarse grid's best. (A search window comes with its v: over the whole coarse grid a clean model's best reads
    its drift at large |v|, 0.17 at v 3.2 on a clean digits16 model.) A search window's grid stays inside the data
    range: just outside it (v 1.3-1.4) clean tiny-photos32-dc fine-tunes read about 0.2 on central windows, whose
    control cannot keep their distance to the borders (window_search.md, its first run)."""
    if top is None:
        coarse = excess_offsets(den, window, gen, COARSE_GRID, VALUE_NOISES)
        top = COARSE_GRID[max(range(len(coarse)), key=coarse.__getitem__)]
        fine_grid = tuple(round(top + FINE_STEP * k, 4) for k in range(-4, 5))
    else:  # a search window: its fine grid stays inside the data range, as the search's values do
        fine_grid = tuple(v for k in range(-4, 5) if abs(v := round(top + FINE_STEP * k, 4)) <= SEARCH_LIMIT)
    peak_input, height = _peak(fine_grid, excess_offsets(den, window, gen, fine_grid, FINE_NOISES))
    return round(height if peak_input >= 0 else -height, 4), round(height, 4), round(peak_input, 4)


def patch_shaped(pixels: list[tuple[int, int]], elements: int, window_elements: int,
                 min_side: int = MIN_PATCH_SIDE) -> bool:
    """Whether a window's pixels (row, col) can be a patch: at least ``min_side`` on each side of their
    bounding box, filling ``PATCH_FILL`` of it, and at most ``MAX_WINDOW_FRACTION`` of the elements. (A clean
    tiny-photos32-dc base of seed 5 and its fine-tunes respond localized at one or two corner pixels, which read as
    backdoor-like: bench_photos32dc_wp_heldout.)"""
    if not pixels or window_elements > MAX_WINDOW_FRACTION * elements:
        return False
    rows, cols = [r for r, _ in pixels], [c for _, c in pixels]
    height, width = max(rows) - min(rows) + 1, max(cols) - min(cols) + 1
    return min(height, width) >= min_side and len(set(pixels)) >= PATCH_FILL * height * width


def first_look_found_patch(summary: dict) -> bool:
    """Whether a probe summary's first look found a patch-shaped window: what L_p is read on. A summary recorded
    before the shape rule (no ``first_look_window`` key) is judged by the window it kept, when that was the first
    look's and fully listed."""
    if "first_look_window" in summary:
        return summary.get("found_by") == "first look"
    if summary.get("found_by") == "search" or not summary.get("window_elements"):
        return False
    listed = summary.get("window_indices") or []
    if len(listed) < summary["window_elements"]:
        return False
    return patch_shaped([(r, c) for _, r, c in listed], summary["elements"], summary["window_elements"])


def window_pixels(window: torch.Tensor) -> list[tuple[int, int]]:
    """(row, col) of every pixel a C x H x W window holds in any channel."""
    return [tuple(p) for p in window.any(0).nonzero().tolist()]


def is_patch_shaped(window: torch.Tensor, min_side: int = MIN_PATCH_SIDE) -> bool:
    """``patch_shaped`` of a C x H x W window."""
    return patch_shaped(window_pixels(window), window.numel(), int(window.sum()), min_side)


@torch.no_grad()
def probe_patch(den, seed: int = 0, search: bool = True, min_side: int = MIN_PATCH_SIDE,  # noqa: ANN001
                search_starts: int = SEARCH_STARTS) -> PatchProbe:
    """Look for a small patch trigger (see the module docstring); forward passes only. ``search``: when the first
    look finds no patch-shaped window, search for one (climbing from ``search_starts`` coarse squares);
    ``min_side``: the smallest patch side, in pixels."""
    if min_side < 1:
        raise TerdError(f"the smallest patch side must be at least 1 pixel, got {min_side}")
    if search_starts < 1:
        raise TerdError(f"the search needs at least one start, got {search_starts}")
    gen = probe_generator(seed)
    flat, support, used = first_look(den, gen)
    window, found_by, search_excess, top, seen, climbs = flat.view(den.image_shape), "first look", None, None, None, None
    pixels = window_pixels(window)
    if not patch_shaped(pixels, window.numel(), int(window.sum()), min_side):
        seen = pixels or None
        if not search:
            return PatchProbe(window, support, used, None, None, None, None, first_look_window=seen)
        window, search_excess, top, climbs = search_window(den, gen, min_side, search_starts)
        found_by, search_excess = "search", round(search_excess, 4)
    value, height, peak_input = _read_value(den, window, gen, top)
    accepted = found_by == "first look" or (height >= SEARCH_ACCEPT and is_patch_shaped(window, min_side))
    candidate = Trigger(window * value, torch.where(window, PATCH_GAMMA, 1.0),
                        meta={"start": "patch-probe", "gamma_init": PATCH_GAMMA}) if accepted else None
    return PatchProbe(window, support, used, value, height, peak_input, candidate, found_by, search_excess, seen,
                      climbs)
