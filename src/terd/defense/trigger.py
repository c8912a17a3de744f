"""A reversed trigger: the backdoor input distribution N(r, diag(gamma^2)) in unit-noise space.

Every noise-space attack puts its trigger on the initial noise as x_T = gamma * eps + r, so this
pair (r, gamma), each C x H x W, is the one object reversion produces and both detectors consume.
Stored as safetensors with tensors ``r`` and ``gamma`` (never a pickle); a scan's candidates file holds
every candidate as ``r_<i>`` / ``gamma_<i>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from terd.errors import TerdError
from terd.models.safe_io import load_tensors

GAMMA_FLOOR = 1e-6  # log(gamma) and 1/gamma^2 stay finite; a reversed gamma this small is a degenerate trigger


@dataclass
class Trigger:
    """r and gamma (C x H x W, float32); backdoor inputs are x_T = gamma * eps + r."""

    r: torch.Tensor
    gamma: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.r = torch.as_tensor(self.r, dtype=torch.float32).detach().cpu()
        self.gamma = torch.as_tensor(self.gamma, dtype=torch.float32).detach().cpu().expand_as(self.r).clone()
        if self.r.dim() != 3:
            raise TerdError(f"a trigger is C x H x W, got r of shape {tuple(self.r.shape)}")
        if not (torch.isfinite(self.r).all() and torch.isfinite(self.gamma).all()):
            raise TerdError("trigger contains NaN or infinite values")
        if (self.gamma < 0).any():
            raise TerdError("trigger gamma must be non-negative")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.r.shape)

    def inputs(self, eps: torch.Tensor) -> torch.Tensor:
        """Backdoor initial noises x_T = gamma * eps + r for unit noises ``eps`` (N x C x H x W)."""
        return self.gamma.to(eps) * eps + self.r.to(eps)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": "terd-trigger/1", "meta": json.dumps(self.meta)}
        save_file({"r": self.r.contiguous(), "gamma": self.gamma.contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, image_shape: tuple[int, int, int] | None = None) -> Trigger:
        """Read a trigger file (safetensors with ``r`` and optional ``gamma``, default 1) and check its shape."""
        return cls.from_tensors(load_tensors(path), path, image_shape)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], path: str | Path,
                     image_shape: tuple[int, int, int] | None = None) -> Trigger:
        """A trigger from a trigger file's tensors (``path`` only names the file in errors)."""
        if "r" not in tensors:
            raise TerdError(f"{path}: not a trigger file (no tensor 'r'; found {', '.join(tensors) or 'none'})")
        r = tensors["r"].float()
        gamma = tensors.get("gamma", torch.ones_like(r)).float()
        if r.dim() == 4 and r.shape[0] == 1:
            r = r[0]
        if gamma.dim() == 4 and gamma.shape[0] == 1:
            gamma = gamma[0]
        if r.dim() != 3:
            raise TerdError(f"{path}: r must be C x H x W, got shape {tuple(r.shape)}")
        if gamma.shape != r.shape and gamma.numel() != 1:
            raise TerdError(f"{path}: gamma has shape {tuple(gamma.shape)}, r has {tuple(r.shape)}")
        if image_shape is not None and tuple(r.shape) != tuple(image_shape):
            raise TerdError(f"{path}: trigger is {' x '.join(map(str, r.shape))}, expected "
                            f"{' x '.join(map(str, image_shape))}")
        try:
            return cls(r, gamma)
        except TerdError as exc:
            raise TerdError(f"{path}: {exc}") from None


IMPLICATED = "implicated"  # a candidates file's optional index tensor: the candidates a backdoor verdict implicates


def save_candidates(triggers: list[Trigger], path: str | Path, implicated: list[int] | None = None) -> None:
    """All candidate triggers in one safetensors file: tensors ``r_<i>`` and ``gamma_<i>`` (C x H x W), and
    ``implicated`` (int64 indices) when a backdoor verdict implicated some (input detection then uses those)."""
    tensors = {}
    for i, trig in enumerate(triggers):  # a Trigger already holds detached CPU float32 tensors
        tensors[f"r_{i}"], tensors[f"gamma_{i}"] = trig.r.contiguous(), trig.gamma.contiguous()
    if implicated:
        tensors[IMPLICATED] = torch.tensor(sorted(implicated), dtype=torch.int64)
    save_file(tensors, str(path))


def load_candidates(path: str | Path) -> list[Trigger]:
    """The candidate triggers a scan saved (see :func:`save_candidates`), in candidate order."""
    return candidates_from_tensors(load_tensors(path), path)


def candidates_from_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> list[Trigger]:
    """The candidates in a candidates file's tensors (``path`` only names the file in errors)."""
    n = len([k for k in tensors if k.startswith("r_")])
    if n == 0 or any(f"r_{i}" not in tensors or f"gamma_{i}" not in tensors for i in range(n)):
        raise TerdError(f"{path}: expected tensors r_0, gamma_0, ... (a terd scan's candidates file)")
    try:
        return [Trigger(tensors[f"r_{i}"], tensors[f"gamma_{i}"]) for i in range(n)]
    except TerdError as exc:
        raise TerdError(f"{path}: {exc}") from None
