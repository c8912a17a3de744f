"""Loading files from untrusted models without ever running code from them.

terd scans models it does not trust, so: safetensors first, ``torch.load(weights_only=True)`` for
pickled ``.pt/.pth/.ckpt/.bin`` (the restricted unpickler refuses any object that is not tensors,
containers and numbers), JSON for configs. Every failure becomes a one-line :class:`TerdError`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from terd.errors import TerdError


def safe_torch_load(path: str | Path) -> object:
    """``torch.load`` restricted to weights: a pickle that tries to run code is refused, not executed."""
    path = Path(path)
    if not path.is_file():
        raise TerdError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unpickling refused"
        raise TerdError(f"{path}: refused to load (it is not plain weights; terd never unpickles code): {first}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise TerdError(f"{path}: corrupt or unreadable checkpoint ({str(exc).splitlines()[0][:200]})") from None


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor mapping from a .safetensors file or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise TerdError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TerdError(f"{path}: corrupt safetensors file ({exc})") from None
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TerdError(f"{path}: expected a mapping of names to tensors")
    return obj


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise TerdError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TerdError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TerdError(f"{path}: expected a JSON object")
    return data
