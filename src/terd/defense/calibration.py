"""Thresholds for model detection: fitting them on benign models, and the ones terd ships.

The shipped file ``default_thresholds.json`` holds one entry per reversion preset (features depend on
the schedule, so a threshold fitted with ``fast`` is not valid for ``paper``). An entry is ``null``
until it has been fitted honestly on at least 3 benign models; ``scan`` then reports the features and
says that no calibrated threshold is available instead of guessing. Each entry's provenance says which
models, preset and seed produced it (``fast``: six benign tiny-digits16 models of the headline bench;
``paper``: four benign tiny-digits16 models).
"""

from __future__ import annotations

import json
from pathlib import Path

from terd.defense.model_detection import Thresholds, fit_thresholds
from terd.defense.reversion import Progress, get_config, reverse_trigger
from terd.errors import TerdError

DEFAULTS_FILE = Path(__file__).with_name("default_thresholds.json")
MIN_MODELS_FOR_DEFAULTS = 3


def default_thresholds(preset: str, path: str | Path | None = None) -> Thresholds | None:
    """The shipped thresholds for a preset, or None when none were calibrated for it (on >= 3 benign models)."""
    path = Path(path) if path is not None else DEFAULTS_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    entry = (data.get("presets") or {}).get(preset)
    if entry is None:
        return None
    thr = Thresholds.from_dict(entry, f"{path} [{preset}]")
    if int(thr.provenance.get("n_models", 0)) < MIN_MODELS_FOR_DEFAULTS:
        return None
    return thr


def model_features(model, preset: str = "fast", *, seed: int = 0, device: str = "cpu",  # noqa: ANN001
                   progress: Progress | None = None) -> dict:
    """Reverse the trigger of one model and return its KL features with the cost."""
    from terd.models import load_denoiser

    den = load_denoiser(model, device=device) if not hasattr(model, "schedule") else model
    res = reverse_trigger(den, get_config(preset), seed=seed, progress=progress)
    return {"model": str(getattr(den, "source", model)), **res.features,
            "network_evaluations": res.network_evaluations, "seconds": res.seconds}


def calibrate(models: list, preset: str = "fast", *, seed: int = 0, device: str = "cpu",
              progress: Progress | None = None) -> tuple[Thresholds, list[dict]]:
    """Fit mean + 3 std thresholds on benign models (the paper's benign-only protocol)."""
    if len(models) < 2:
        raise TerdError(f"calibration needs at least 2 benign models, got {len(models)}")
    feats = [model_features(m, preset, seed=seed, device=device, progress=progress) for m in models]
    thr = fit_thresholds(feats, provenance={"preset": preset, "seed": seed, "models": [f["model"] for f in feats]})
    return thr, feats


def install_defaults(thresholds: Thresholds, preset: str, path: str | Path | None = None) -> Path:
    """Write a fitted threshold set as the shipped default for ``preset`` (a maintainer's step)."""
    if int(thresholds.provenance.get("n_models", 0)) < MIN_MODELS_FOR_DEFAULTS:
        raise TerdError(f"defaults need thresholds fitted on at least {MIN_MODELS_FOR_DEFAULTS} benign models")
    path = Path(path) if path is not None else DEFAULTS_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("presets", {})[preset] = thresholds.to_dict()
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
