"""The TERD defense, written once against the :class:`~terd.models.Denoiser` wrapper in unit-noise space.

- :mod:`~terd.defense.loss`: the attack-agnostic reversed loss (noise-difference form).
- :mod:`~terd.defense.reversion`: two-stage trigger reversion, presets ``fast`` and ``paper``, resumable.
- :mod:`~terd.defense.trigger`: the reversed trigger (r, gamma): backdoor inputs are gamma * eps + r.
- :mod:`~terd.defense.model_detection`: KL features M_r, V_r, P_r, the patch probe's L_p, and the benign-only threshold rule.
- :mod:`~terd.defense.input_detection`: likelihood-ratio input detector with exact false-positive control,
  over one trigger or over every candidate of a scan, and a guard that screens initial noise before generation.
- :mod:`~terd.defense.calibration`: fitting thresholds on benign models; the shipped defaults.
"""

from terd.defense.calibration import calibrate, default_thresholds
from terd.defense.input_detection import (
    BackdoorInputError,
    CandidateSetDetector,
    GuardReport,
    InputDetector,
    best_possible_tpr,
    guard_inputs,
    guarded_sample,
    llr,
    load_input_detector,
)
from terd.defense.loss import reversed_loss
from terd.defense.model_detection import (
    ModelVerdict,
    Thresholds,
    detect_model,
    fit_thresholds,
    kl_features,
)
from terd.defense.reversion import PRESETS, ReversionConfig, ReversionResult, get_config, reverse_trigger
from terd.defense.trigger import Trigger

__all__ = [
    "PRESETS", "BackdoorInputError", "CandidateSetDetector", "GuardReport", "InputDetector", "ModelVerdict", "ReversionConfig",
    "ReversionResult", "Thresholds", "Trigger", "best_possible_tpr", "calibrate", "default_thresholds", "detect_model", "fit_thresholds",
    "get_config", "guard_inputs", "guarded_sample", "kl_features", "llr", "load_input_detector", "reverse_trigger",
    "reversed_loss",
]
