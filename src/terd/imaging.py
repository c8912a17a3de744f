"""Images in and out: [-1, 1] tensors <-> PNG files and sample grids (PIL only, no torchvision)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from terd.errors import TerdError


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model images in [-1, 1] as [0, 1] pixels (what MSE, SSIM and the thresholds are in)."""
    return ((x.float().cpu() + 1) / 2).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x C x H x W in [-1, 1] -> N x H x W x C uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile a batch into one picture (white 2-px gaps), optionally upscaled (nearest) for small images."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = arr[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, 64 // images.shape[-1])
    grid(images, nrow=nrow, scale=scale).save(path)
    return path


def load_image(path: str | Path, channels: int, size: int) -> torch.Tensor:
    """A PNG/JPEG as a C x size x size tensor in [-1, 1] (grayscale = luminance)."""
    path = Path(path)
    try:
        img = Image.open(path).convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise TerdError(f"{path}: no such image") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise TerdError(f"{path}: unreadable image ({exc})") from None
    img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)
