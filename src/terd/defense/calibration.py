"""Thresholds for model detection: fitting them on benign models, and the ones terd ships.

The shipped file ``default_thresholds.json`` holds entries per reversion preset (features depend on the schedule,
so a threshold fitted with ``fast`` is not valid for ``paper``) and per model architecture: the KL features of
benign models differ by architecture (benign tiny-photos32 models sit over the tiny-digits16 thresholds,
threshold_scope.md), so an entry names the network layout and schedule it was fitted on (``applies_to``) and is
only offered to a model with that layout. Keys are the preset (``fast``, ``paper``: tiny-digits16) or
``PRESET@FAMILY`` for another family. An entry counts once fitted honestly on at least 3 benign models; where
none applies, ``scan`` reports the features and says that no calibrated threshold is available instead of guessing.
Each entry's provenance says which models, preset and seed produced it.
"""

from __future__ import annotations

import json
from pathlib import Path

from terd.defense.model_detection import Thresholds, fit_thresholds
from terd.defense.reversion import Progress, get_config, reverse_trigger
from terd.errors import TerdError

DEFAULTS_FILE = Path(__file__).with_name("default_thresholds.json")
MIN_MODELS_FOR_DEFAULTS = 3


ARCHITECTURE_FIELDS = ("in_channels", "out_channels", "sample_size", "block_out_channels", "layers_per_block",
                       "down_block_types", "up_block_types", "mid_block_type", "norm_num_groups",
                       "attention_head_dim", "add_attention", "time_embedding_type")


def architecture(den) -> dict | None:  # noqa: ANN001
    """What a threshold fit depends on besides the weights: the UNet's layout and the schedule (None when the
    network is not a diffusers UNet2DModel, whose layout terd can compare)."""
    cfg = getattr(den.network, "config", None)
    if den.family != "diffusers-unet2d" or cfg is None:
        return None
    layout = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in dict(cfg).items()
              if k in ARCHITECTURE_FIELDS}
    return {"schedule": den.schedule.kind, "parameterization": den.schedule.parameterization,
            "num_timesteps": den.schedule.num_timesteps, **layout}


def preset_architecture(name: str) -> dict:
    """:func:`architecture` of a model trained from scratch on a terd preset (a randomly initialised one)."""
    from diffusers import UNet2DModel

    from terd.models import Denoiser
    from terd.presets import get_preset

    p = get_preset(name)
    return architecture(Denoiser(UNet2DModel(**p.unet_config()), p.noise_schedule(), (p.channels, p.size, p.size)))


def _shipped(preset: str, path: Path) -> list[tuple[str, Thresholds]]:
    """The usable entries for a preset (fitted on >= MIN_MODELS_FOR_DEFAULTS models), the plain key first."""
    if not path.is_file():
        return []
    entries = json.loads(path.read_text()).get("presets") or {}
    out = []
    for key in sorted((k for k in entries if k == preset or k.startswith(preset + "@")), key=lambda k: (k != preset, k)):
        if entries[key] is None:
            continue
        thr = Thresholds.from_dict(entries[key], f"{path} [{key}]")
        if int(thr.provenance.get("n_models", 0)) >= MIN_MODELS_FOR_DEFAULTS:
            out.append((key, thr))
    return out


def default_thresholds(preset: str, path: str | Path | None = None, model=None) -> Thresholds | None:  # noqa: ANN001
    """The shipped thresholds for a preset, or None when none were calibrated for it (on >= 3 benign models).

    With ``model`` (a Denoiser), only an entry fitted on that model's architecture (``applies_to``) is returned;
    an entry without ``applies_to`` (a file written before it existed) applies to any model."""
    path = Path(path) if path is not None else DEFAULTS_FILE
    layout = architecture(model) if model is not None else None
    for key, thr in _shipped(preset, path):
        if model is None:
            return thr if key == preset else None
        if thr.provenance.get("applies_to") in (None, layout):
            return thr
    return None


def shipped_families(preset: str, path: str | Path | None = None) -> list[str]:
    """The model families terd ships thresholds for, for a preset (what a user without a match is told)."""
    path = Path(path) if path is not None else DEFAULTS_FILE
    return [str(thr.provenance.get("family", key)) for key, thr in _shipped(preset, path)]


def model_features(model, preset: str = "fast", *, seed: int = 0, device: str = "cpu",  # noqa: ANN001
                   progress: Progress | None = None) -> dict:
    """Reverse the trigger of one model and return its KL features with the cost."""
    from terd.models import load_denoiser

    den = load_denoiser(model, device=device) if not hasattr(model, "schedule") else model
    res = reverse_trigger(den, get_config(preset), seed=seed, progress=progress)
    return {"model": str(getattr(den, "source", model)), **res.features,
            "network_evaluations": res.network_evaluations, "seconds": res.seconds,
            "architecture": architecture(den)}


def calibrate(models: list, preset: str = "fast", *, seed: int = 0, device: str = "cpu",
              progress: Progress | None = None) -> tuple[Thresholds, list[dict]]:
    """Fit mean + 3 std thresholds on benign models (the paper's benign-only protocol)."""
    if len(models) < 2:
        raise TerdError(f"calibration needs at least 2 benign models, got {len(models)}")
    feats = [model_features(m, preset, seed=seed, device=device, progress=progress) for m in models]
    provenance = {"preset": preset, "seed": seed, "models": [f["model"] for f in feats]}
    layouts = [f.pop("architecture") for f in feats]
    if layouts[0] is not None and all(a == layouts[0] for a in layouts):  # what scan checks a model against
        provenance["applies_to"] = layouts[0]
    return fit_thresholds(feats, provenance=provenance), feats


def install_defaults(thresholds: Thresholds, key: str, path: str | Path | None = None,
                     family: str | None = None) -> Path:
    """Write a fitted threshold set as a shipped default (a maintainer's step). ``key`` is the preset, or
    ``PRESET@FAMILY`` for another family; ``family`` (the terd preset the benign models were trained with)
    records that preset's architecture as ``applies_to``, so the entry is offered only to models laid out alike."""
    if int(thresholds.provenance.get("n_models", 0)) < MIN_MODELS_FOR_DEFAULTS:
        raise TerdError(f"defaults need thresholds fitted on at least {MIN_MODELS_FOR_DEFAULTS} benign models")
    if family is not None:
        thresholds.provenance = {**thresholds.provenance, "family": family,
                                 "applies_to": preset_architecture(family)}
    path = Path(path) if path is not None else DEFAULTS_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("presets", {})[key] = thresholds.to_dict()
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
