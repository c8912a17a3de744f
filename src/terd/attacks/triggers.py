"""Procedural triggers and targets at any resolution and channel count.

The attack papers ship their triggers and targets as 32x32 (or 256x256) PNGs. Here every one is drawn
from its geometry, so the same name gives the right picture for a 1 x 16 x 16 digits model and a
3 x 64 x 64 photo model alike, and no asset files are needed. Shapes are drawn as antialiased coverage
masks (supersampled, box-filtered) and composited in float, so flat colours such as BadDiffusion's grey
box (exactly 0) stay exact. Grayscale images are the luminance of the RGB drawing.

Conventions (see docs/attacks.md):

- BadDiffusion / VillanDiffusion triggers have background -1, so adding one to the initial noise shifts
  the whole image (that is what the network learns to recognise), and the trigger sits bottom-right
  with size ``round(14 H / 32)`` and gap ``max(1, round(2 H / 32))``.
- Targets are passed through "bg2grey": values <= -0.4 become -0.4.
- TrojDiff triggers are an image ``delta`` in [-1, 1] (the "blend" pattern) or a white patch
  (``round(3 H / 32)`` pixels square, in the bottom-right corner; variants elsewhere and larger, so a defense
  is not judged on one place and size only). A patch delta is 0 off the patch: its nonzero pixels are the patch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from terd.errors import TerdError
from terd.imaging import load_image, save_grid
from terd.trigger_names import BOX_SIZES, NAMED_PATCHES, PATCH_GRAMMAR, PATCH_PLACES, parse_patch

RGB = tuple[float, float, float]
_LUMA = (0.299, 0.587, 0.114)
_SUPERSAMPLE = 8


# ------------------------------------------------------------------------------------------------
# Drawing helpers
# ------------------------------------------------------------------------------------------------

def _to_channels(rgb: torch.Tensor, channels: int) -> torch.Tensor:
    """3 x H x W -> C x H x W: RGB as is, anything else the luminance (repeated when C > 1)."""
    if channels == 3:
        return rgb
    if channels < 1:
        raise TerdError(f"channels must be at least 1, got {channels}")
    luma = (rgb * torch.tensor(_LUMA, dtype=rgb.dtype).view(3, 1, 1)).sum(0, keepdim=True)
    return luma.repeat(channels, 1, 1)


class _Canvas:
    """A float RGB image in [-1, 1] that antialiased shapes (given in [0, 1] coordinates) are painted on."""

    def __init__(self, size: int, background: RGB | float = -1.0) -> None:
        if size < 2:
            raise TerdError(f"image size must be at least 2, got {size}")
        self.size = size
        bg = (background,) * 3 if isinstance(background, int | float) else background
        self.rgb = torch.tensor(bg, dtype=torch.float32).view(3, 1, 1).repeat(1, size, size)

    def _coverage(self, draw_fn: Callable[[ImageDraw.ImageDraw, float], None]) -> torch.Tensor:
        big = self.size * _SUPERSAMPLE
        mask = Image.new("L", (big, big), 0)
        draw_fn(ImageDraw.Draw(mask), float(big))
        small = mask.resize((self.size, self.size), Image.BOX)
        return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)

    def paint(self, color: RGB | float, draw_fn: Callable[[ImageDraw.ImageDraw, float], None]) -> None:
        col = (color,) * 3 if isinstance(color, int | float) else color
        a = self._coverage(draw_fn)
        c = torch.tensor(col, dtype=torch.float32).view(3, 1, 1)
        self.rgb = self.rgb * (1 - a) + c * a

    def polygon(self, color: RGB | float, points: Sequence[tuple[float, float]]) -> None:
        self.paint(color, lambda d, s: d.polygon([(x * s, y * s) for x, y in points], fill=255))

    def ellipse(self, color: RGB | float, box: tuple[float, float, float, float]) -> None:
        self.paint(color, lambda d, s: d.ellipse([v * s for v in box], fill=255))

    def rect(self, color: RGB | float, box: tuple[float, float, float, float]) -> None:
        self.paint(color, lambda d, s: d.rectangle([v * s for v in box], fill=255))

    def line(self, color: RGB | float, points: Sequence[tuple[float, float]], width: float) -> None:
        self.paint(color, lambda d, s: d.line([(x * s, y * s) for x, y in points], fill=255,
                                              width=max(1, round(width * s))))

    def image(self, channels: int) -> torch.Tensor:
        return _to_channels(self.rgb.clamp(-1, 1), channels)


def corner_box(size: int, box_px32: int = 14, gap_px32: int = 2) -> tuple[int, int]:
    """(first row/col, side) of a bottom-right square scaled from its 32-px geometry.

    side = round(box * H / 32), gap = max(1, round(gap * H / 32)); at 32 px the default is rows 16..29.
    """
    side = max(1, round(box_px32 * size / 32))
    gap = max(1, round(gap_px32 * size / 32))
    return size - gap - side, side


# ------------------------------------------------------------------------------------------------
# BadDiffusion / VillanDiffusion triggers (background -1)
# ------------------------------------------------------------------------------------------------

def box_trigger(channels: int, size: int, *, box_px32: int = 14, value: float = 0.0) -> torch.Tensor:
    """A flat square (grey 0 = BadDiffusion BOX; white 1 = VillanDiffusion SM_BOX) on background -1."""
    start, side = corner_box(size, box_px32)
    img = torch.full((channels, size, size), -1.0)
    img[:, start:start + side, start:start + side] = value
    return img


# 3 x 5 bitmap glyphs for the letters cut out of the stop sign.
_GLYPHS = {
    "S": ("111", "100", "111", "001", "111"),
    "T": ("111", "010", "010", "010", "010"),
    "O": ("111", "101", "101", "101", "111"),
    "P": ("111", "101", "111", "100", "100"),
}


def stop_sign_trigger(channels: int, size: int, *, box_px32: int = 14) -> torch.Tensor:
    """BadDiffusion STOP_SIGN: a red octagon in the trigger square, its white letters removed (-1)."""
    start, side = corner_box(size, box_px32)
    x0, s = start / size, side / size
    k = s / (2 + math.sqrt(2))  # corner cut of the regular octagon inscribed in a square of side s
    c = _Canvas(size)
    oct_pts = [(x0 + k, x0), (x0 + s - k, x0), (x0 + s, x0 + k), (x0 + s, x0 + s - k),
               (x0 + s - k, x0 + s), (x0 + k, x0 + s), (x0, x0 + s - k), (x0, x0 + k)]
    c.polygon((1.0, -1.0, -1.0), oct_pts)
    # "STOP": 4 glyphs of 3 columns with 1-column gaps = 15 columns across 80% of the sign, 5 rows tall
    cell = 0.8 * s / 15
    left, top = x0 + 0.1 * s, x0 + s / 2 - 2.5 * cell
    for i, ch in enumerate("STOP"):
        for r, row in enumerate(_GLYPHS[ch]):
            for col, bit in enumerate(row):
                if bit == "1":
                    gx = left + (4 * i + col) * cell
                    c.rect(-1.0, (gx, top + r * cell, gx + cell, top + (r + 1) * cell))
    return c.image(channels)


def glasses_trigger(channels: int, size: int) -> torch.Tensor:
    """Dark sunglasses centred on the face line (width 0.625 H), on background -1.

    The lenses are dark grey (not -1, which is the background and would make them invisible to the
    noise shift); the frame is a lighter grey.
    """
    c = _Canvas(size)
    w = 0.625
    left = (1 - w) / 2
    lens_w, lens_h, top = 0.27, 0.17, 0.36
    frame = (0.3, 0.3, 0.3)
    lens = (-0.45, -0.45, -0.35)
    c.line(frame, [(left + lens_w - 0.01, top + 0.05), (1 - left - lens_w + 0.01, top + 0.05)], 0.035)
    for x in (left, 1 - left - lens_w):
        c.ellipse(frame, (x - 0.015, top - 0.015, x + lens_w + 0.015, top + lens_h + 0.015))
        c.ellipse(lens, (x, top, x + lens_w, top + lens_h))
    return c.image(channels)


# ------------------------------------------------------------------------------------------------
# Targets (bg2grey)
# ------------------------------------------------------------------------------------------------

def bg2grey(img: torch.Tensor, floor: float = -0.4) -> torch.Tensor:
    """BadDiffusion's target preprocessing: values <= -0.4 are clamped to -0.4 (black -> dark grey)."""
    return img.clamp(min=floor)


def corner_target(channels: int, size: int) -> torch.Tensor:
    """CORNER: value 0 on the top-left rows/cols 0..9 at 32 px (scaled), -0.4 elsewhere."""
    side = max(1, round(10 * size / 32))
    img = torch.full((channels, size, size), -0.4)
    img[:, :side, :side] = 0.0
    return img


def hat_target(channels: int, size: int) -> torch.Tensor:
    """HAT: a fedora, brim across the full width in the lower half, crown above, a dark band."""
    c = _Canvas(size)
    body = (0.75, 0.7, 0.6)
    c.ellipse(body, (0.02, 0.58, 0.98, 0.80))                       # brim
    c.polygon(body, [(0.24, 0.68), (0.28, 0.30), (0.42, 0.22), (0.50, 0.28), (0.58, 0.22),
                     (0.72, 0.30), (0.76, 0.68)])                   # crown with the pinch on top
    c.rect((-0.2, -0.25, -0.3), (0.255, 0.54, 0.745, 0.64))          # band
    return bg2grey(c.image(channels))


def shoe_target(channels: int, size: int) -> torch.Tensor:
    """SHOE: a FashionMNIST-style ankle boot in profile, grey with a light sole."""
    c = _Canvas(size)
    body = (0.35, 0.35, 0.35)
    c.polygon(body, [(0.22, 0.12), (0.52, 0.12), (0.55, 0.50), (0.80, 0.60), (0.92, 0.70), (0.92, 0.80),
                     (0.18, 0.80), (0.20, 0.45)])
    c.rect((0.85, 0.85, 0.85), (0.16, 0.78, 0.94, 0.88))             # sole
    c.rect((0.8, 0.8, 0.8), (0.20, 0.08, 0.54, 0.16))                # collar
    c.line((0.05, 0.05, 0.05), [(0.30, 0.25), (0.45, 0.25), (0.30, 0.35), (0.46, 0.35)], 0.03)  # laces
    return bg2grey(c.image(channels))


def cat_target(channels: int, size: int) -> torch.Tensor:
    """CAT: a cat's head (ears, eyes, nose) as a light silhouette."""
    c = _Canvas(size)
    fur = (0.8, 0.65, 0.45)
    c.polygon(fur, [(0.16, 0.08), (0.40, 0.30), (0.18, 0.42)])        # left ear
    c.polygon(fur, [(0.84, 0.08), (0.60, 0.30), (0.82, 0.42)])        # right ear
    c.ellipse(fur, (0.12, 0.22, 0.88, 0.92))                           # head
    for x in (0.30, 0.58):
        c.ellipse((-1.0, -0.6, -1.0), (x, 0.45, x + 0.12, 0.58))       # eyes
    c.polygon((0.9, 0.2, 0.3), [(0.45, 0.66), (0.55, 0.66), (0.50, 0.73)])  # nose
    return bg2grey(c.image(channels))


def mickey_target(channels: int, size: int) -> torch.Tensor:
    """MICKEY: the mouse-head silhouette (three discs) standing in for TrojDiff's D2I Mickey Mouse."""
    c = _Canvas(size)
    ink = (0.9, 0.9, 0.9)
    c.ellipse(ink, (0.05, 0.05, 0.42, 0.42))
    c.ellipse(ink, (0.58, 0.05, 0.95, 0.42))
    c.ellipse(ink, (0.20, 0.28, 0.80, 0.88))
    return bg2grey(c.image(channels))


# ------------------------------------------------------------------------------------------------
# TrojDiff triggers (an image delta in [-1, 1])
# ------------------------------------------------------------------------------------------------

def blend_pattern(channels: int, size: int) -> torch.Tensor:
    """TrojDiff's blend trigger delta: a built-in high-contrast pattern (rings crossed with stripes).

    TrojDiff blends a Hello Kitty picture; any fixed, structured image serves: what matters is that it is
    far from Gaussian noise so the shifted noise is recognisable. Colour channels get phase-shifted rings
    so the RGB version is colourful; the grayscale one keeps full contrast.
    """
    v, u = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    radius = ((u - 0.5) ** 2 + (v - 0.5) ** 2).sqrt()
    chans = []
    for phase in (0.0, 2.1, 4.2):
        rings = torch.cos(2 * math.pi * 2.5 * radius + phase)
        stripes = torch.cos(2 * math.pi * 2 * (u + v))
        chans.append((0.65 * rings + 0.35 * stripes).clamp(-1, 1))
    rgb = torch.stack(chans)
    if channels == 3:
        return rgb
    return torch.stack([chans[0]] * channels)  # grayscale: one phase, full contrast (luminance would cancel)



def patch_size(size: int, px32: int = 3) -> int:
    """A patch of ``px32`` pixels at 32 px, scaled (at least 1 pixel); TrojDiff's is 3 x 3 at 32 px."""
    return max(1, round(px32 * size / 32))


def patch_mask(channels: int, size: int, *, px32: int = 3, where: str = "bottom-right") -> torch.Tensor:
    """1 on a p x p patch flush with the ``where`` corner (or centred), 0 elsewhere: also the white patch trigger
    delta itself (white on the patch, 0 off it, so its support is the patch)."""
    if where not in PATCH_PLACES:
        raise TerdError(f"patch place must be one of {', '.join(PATCH_PLACES)}, got {where!r}")
    p = min(patch_size(size, px32), size)
    start = {"bottom-right": size - p, "top-left": 0, "centre": (size - p) // 2}[where]
    m = torch.zeros(channels, size, size)
    m[:, start:start + p, start:start + p] = 1.0
    return m


# ------------------------------------------------------------------------------------------------
# Registries
# ------------------------------------------------------------------------------------------------

def _box_variant(px32: int, value: float) -> Callable[[int, int], torch.Tensor]:
    return lambda c, s: box_trigger(c, s, box_px32=px32, value=value)


def _patch_variant(px32: int, where: str) -> Callable[[int, int], torch.Tensor]:
    return lambda c, s: patch_mask(c, s, px32=px32, where=where)


TRIGGERS: dict[str, Callable[[int, int], torch.Tensor]] = {
    "box": _box_variant(14, 0.0),
    "box-white": _box_variant(14, 1.0),
    **{f"box-{n}": _box_variant(n, 0.0) for n in BOX_SIZES},
    "stop-sign": stop_sign_trigger,
    "glasses": glasses_trigger,
    "blend": blend_pattern,
    **{name: _patch_variant(*parse_patch(name)) for name in NAMED_PATCHES},
}
"""Trigger names. ``box``/``box-N``/``box-white``/``stop-sign``/``glasses``: BadDiffusion-style (bg -1);
``blend``/``patch``/``patch-*``: TrojDiff deltas. Beyond the listed patch names, any ``patch-N``,
``patch-PLACE`` or ``patch-N-PLACE`` is a white N px (at 32 px, scaled) patch at PLACE
(:func:`terd.trigger_names.parse_patch`)."""
PATCH_TRIGGERS = tuple(name for name in TRIGGERS if name.startswith("patch"))  # the named ones

TARGETS: dict[str, Callable[[int, int], torch.Tensor]] = {
    "corner": corner_target,
    "hat": hat_target,
    "shoe": shoe_target,
    "cat": cat_target,
    "mickey": mickey_target,
}


def make_trigger(name: str, channels: int, size: int) -> torch.Tensor:
    """A named trigger as a C x size x size float tensor in [-1, 1]."""
    patch = parse_patch(name)
    build = _patch_variant(*patch) if patch is not None else TRIGGERS.get(name)
    if build is None:
        raise TerdError(f"unknown trigger {name!r} (available: {', '.join(TRIGGERS)}, or {PATCH_GRAMMAR})")
    return build(channels, size).float().contiguous()


def make_target(name: str, channels: int, size: int) -> torch.Tensor:
    """A named target as a C x size x size float tensor in [-0.4, 1] (bg2grey applied)."""
    if name not in TARGETS:
        raise TerdError(f"unknown target {name!r} (available: {', '.join(TARGETS)})")
    return TARGETS[name](channels, size).float().contiguous()


def image_as_trigger(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """A user picture as a trigger (resized, grayscale = luminance), values in [-1, 1].

    For BadDiffusion-style attacks black pixels (-1) are the background, as with the built-in triggers.
    """
    return load_image(path, channels, size).float().contiguous()


def image_as_target(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """A user picture as a target image (no bg2grey: the user's pixels are the target)."""
    return load_image(path, channels, size).float().contiguous()


def save_picture(img: torch.Tensor, path: str | Path) -> Path:
    """One C x H x W image as a PNG (upscaled with nearest-neighbour for small sizes)."""
    return save_grid(img.unsqueeze(0), path, nrow=1)


def save_gallery(out_dir: str | Path, channels: int = 3, size: int = 32) -> list[Path]:
    """A PNG of every named trigger and target at one shape (for docs and eyeballing)."""
    out_dir = Path(out_dir)
    paths = [save_picture(make_trigger(n, channels, size), out_dir / f"trigger-{n}.png") for n in TRIGGERS]
    paths += [save_picture(make_target(n, channels, size), out_dir / f"target-{n}.png") for n in TARGETS]
    return paths
