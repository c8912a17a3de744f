"""Reading tensors the user hands us (initial noises, triggers) with shape checks and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from terd.errors import TerdError
from terd.models.safe_io import load_tensors


def load_noise(path: str | Path, image_shape: tuple[int, int, int], key: str | None = None) -> torch.Tensor:
    """N x C x H x W initial noises from safetensors (one tensor, or ``key``) or a ``.npy`` file."""
    path = Path(path)
    if not path.is_file():
        raise TerdError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            x = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        except (ValueError, OSError) as exc:
            raise TerdError(f"{path}: unreadable .npy ({exc})") from None
    elif path.suffix == ".safetensors":
        tensors = load_tensors(path)
        if key is not None:
            if key not in tensors:
                raise TerdError(f"{path}: no tensor named {key!r} (found {', '.join(tensors)})")
            x = tensors[key]
        elif len(tensors) == 1:
            x = next(iter(tensors.values()))
        elif "x" in tensors:
            x = tensors["x"]
        else:
            raise TerdError(f"{path}: several tensors ({', '.join(tensors)}); name one 'x'")
        x = x.float()
    else:
        raise TerdError(f"{path}: expected a .safetensors or .npy file")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(image_shape):
        raise TerdError(f"{path}: expected N x {' x '.join(map(str, image_shape))} noises, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise TerdError(f"{path}: contains NaN or infinite values")
    return x
