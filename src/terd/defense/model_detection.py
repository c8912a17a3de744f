"""Model detection: is the reversed trigger distribution far from the benign N(0, I)?

Per dimension KL_i = KL(N(r_i, gamma_i^2) || N(0, 1)) = -log gamma_i + (gamma_i^2 + r_i^2 - 1) / 2;
features M_r = mean_i KL_i and V_r = var_i KL_i (the paper's), and P_r, the peak local KL: the largest mean
of KL over a 2 x 2 pixel window (all channels). Why P_r: M_r and V_r average over the whole image, so a
trigger confined to a few pixels barely moves them (a working 2 x 2 TrojDiff patch on 16 x 16 digits:
4 of 256 dimensions, scored benign, measured); a 2 x 2 window is the smallest that asks for spatial
coherence, which single-pixel noise in a benign model's reversed trigger does not have.

One feature is the model's, not a candidate's: L_p, how localized the model's own response to noise is
(patch_probe.py): the image's element count over the effective support of the leading principal component of its
residual at t = T - 1. Why: TERD's loss cancels constant offsets, which is what a TrojDiff patch model learns, so
no candidate lands on the patch and a 3 x 3 patch at 32 px passed M_r, V_r and P_r (bench_photos32dc_heldout);
but its response is confined to the patch (support 33-34 of 3,072 elements, benign 957-2,563: patch_probe.md).
A second is W_p, the excess explained offset the probe read on its window (found by its first look or, failing
that, by its search): how much of a patch-valued offset the model removes there beyond what it removes on a mirrored
window. Why: a larger patch (3 x 3 at 16 px, 6 x 6 at 32 px) draws no localized response from benign noise, so L_p
misses it, while the model removes most of the trigger's value when the window holds it (window_search.md).

The decision is the paper's benign-only rule: thresholds = mean + 3 std of each feature over benign reference
models; a model is flagged when any feature exceeds its threshold. Thresholds are a JSON file that says how they
were made; a file without a P_r, L_p or W_p threshold (made before it existed) decides without it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from terd.defense.trigger import GAMMA_FLOOR, Trigger
from terd.errors import TerdError
from terd.models.safe_io import read_json

KL_FEATURES = ("M_r", "V_r", "P_r")  # per reversion candidate: the scan statistic is each one's maximum
MODEL_FEATURES = ("L_p", "W_p")  # one per model: the patch probe's localization and its window's excess offset
FEATURES = KL_FEATURES + MODEL_FEATURES
REQUIRED_FEATURES = ("M_r", "V_r")  # a thresholds file may lack P_r, L_p and W_p (older files)
PEAK_WINDOW = 2
THRESHOLDS_FORMAT = "terd-thresholds/1"
# Measured on digits16 (bench_digits16_core): leave-one-out thresholds fitted on 4 benign models flagged 1 of 5
# benign models; fitted on 6, none of 7. Fewer than this many is fitted, with a warning.
FEW_BENIGN_MODELS = 6


def kl_per_dim(r: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """KL(N(r_i, gamma_i^2) || N(0,1)) per dimension, float64, gamma guarded away from 0."""
    r = r.double()
    g = gamma.double().clamp(min=GAMMA_FLOOR)
    return -g.log() + (g.square() + r.square() - 1) / 2


def kl_peak_window(kl: torch.Tensor, window: int = PEAK_WINDOW) -> dict:
    """Where a C x H x W KL map is largest on average over a ``window`` x ``window`` pixel square (all channels):
    {"value", "row", "col", "size"} (row, col: the square's top-left pixel)."""
    if kl.dim() != 3:
        raise ValueError(f"expected a C x H x W KL map, got shape {tuple(kl.shape)}")
    k = max(1, min(window, kl.shape[1], kl.shape[2]))
    pooled = torch.nn.functional.avg_pool2d(kl.mean(dim=0, keepdim=True).unsqueeze(0), k, stride=1)[0, 0]
    at = int(pooled.argmax())
    return {"value": float(pooled.flatten()[at]), "row": at // pooled.shape[1], "col": at % pooled.shape[1], "size": k}


def peak_local_kl(kl: torch.Tensor, window: int = PEAK_WINDOW) -> float:
    """The largest mean of a C x H x W KL map over a ``window`` x ``window`` pixel square (all channels)."""
    return kl_peak_window(kl, window)["value"]


def kl_features(trigger: Trigger) -> dict[str, float]:
    """{"M_r": mean KL, "V_r": population variance of KL, "P_r": peak local KL} over the C*H*W dimensions."""
    kl = kl_per_dim(trigger.r, trigger.gamma)
    flat = kl.flatten()
    return {"M_r": float(flat.mean()), "V_r": float(flat.var(unbiased=False)), "P_r": peak_local_kl(kl)}


def localization(leading_support: float | None, elements: int, patch_response: bool = True) -> float | None:
    """L_p: ``elements`` over the effective support of the model's leading response component (None: the probe saw
    no response, or did not run). 1 = spread evenly over the image; a random direction gives about 3. A response
    that is not patch-shaped (``patch_response`` False: localized on a pixel or two, or scattered, as clean
    tiny-photos32-dc models of one base do at their corners) reads 1: L_p measures a patch's localization."""
    if leading_support is None or leading_support <= 0:
        return None
    return float(elements) / float(leading_support) if patch_response else 1.0


def candidate_features(per_candidate: list[dict[str, float]]) -> dict[str, float]:
    """The scan statistic: each feature's maximum over the reversion candidates (any anomalous candidate counts).

    Why the maximum and not the candidate with the lowest loss: a TrojDiff trigger (gamma ~0.6) and the benign
    solution (gamma ~1) reach similar reversed losses on small models, so picking one by loss flips with noise
    (measured: with the CPU thread count). Thresholds are fitted on the same statistic of benign models.
    """
    if not per_candidate:
        raise ValueError("no candidates")
    return {f: max(float(c[f]) for c in per_candidate) for f in KL_FEATURES if all(f in c for c in per_candidate)}


@dataclass
class Thresholds:
    """Per-feature decision thresholds plus where they came from (benign models, preset, rule)."""

    M_r: float
    V_r: float
    provenance: dict = field(default_factory=dict)
    P_r: float | None = None  # None: fitted before P_r existed; the decision then goes without it
    L_p: float | None = None  # likewise for L_p
    W_p: float | None = None  # and W_p

    @classmethod
    def of(cls, values: dict[str, float], provenance: dict) -> Thresholds:
        """From a feature -> threshold map (the required features and any optional ones)."""
        return cls(values["M_r"], values["V_r"], provenance, **{f: values.get(f) for f in FEATURES
                                                                if f not in REQUIRED_FEATURES})

    def values(self) -> dict[str, float]:
        """The thresholds that take part in the decision, by feature."""
        return {f: getattr(self, f) for f in FEATURES if getattr(self, f) is not None}

    def to_dict(self) -> dict:
        return {"format": THRESHOLDS_FORMAT, **self.values(), "provenance": self.provenance}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict, where: str = "thresholds") -> Thresholds:
        try:
            vals = {f: float(data[f]) for f in FEATURES if f in REQUIRED_FEATURES or data.get(f) is not None}
        except (KeyError, TypeError, ValueError):
            raise TerdError(f"{where}: expected numeric 'M_r' and 'V_r' thresholds (and optionally 'P_r', 'L_p', 'W_p')") from None
        if not all(math.isfinite(v) for v in vals.values()):
            raise TerdError(f"{where}: thresholds must be finite")
        return cls.of(vals, dict(data.get("provenance") or {}))

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        return cls.from_dict(read_json(path), str(path))


def fit_thresholds(features_of_benign_models: list[dict[str, float]], *, k: float = 3.0,
                   provenance: dict | None = None) -> Thresholds:
    """mean + k * std (sample std) of each feature over benign models (the paper's benign-only rule).

    Needs at least 2 models; the provenance records how many and warns below 3.
    """
    n = len(features_of_benign_models)
    if n < 2:
        raise TerdError(f"fitting thresholds needs features of at least 2 benign models, got {n}")
    out, stats = {}, {}
    for f in FEATURES:
        if f not in REQUIRED_FEATURES and not all(f in x for x in features_of_benign_models):
            continue  # features from scans made before P_r / L_p / W_p existed (or with the probe off)
        vals = [float(x[f]) for x in features_of_benign_models]
        mean, std = statistics.fmean(vals), statistics.stdev(vals)
        out[f] = mean + k * std
        stats[f] = {"mean": mean, "std": std, "values": vals}
    prov = {"rule": f"mean + {k:g} * std over benign models (sample std)", "n_models": n, "stats": stats,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **(provenance or {})}
    if n < FEW_BENIGN_MODELS:
        prov["warning"] = (f"fitted on {n} benign models (fewer than {FEW_BENIGN_MODELS}): the std estimate is "
                           "unreliable and benign models may be flagged")
    return Thresholds.of(out, prov)


def refit_feature(thresholds: Thresholds, feature: str, values: list[float], models: list[str], *,
                  k: float = 3.0) -> Thresholds:
    """``thresholds`` with one feature fitted (mean + k * std) on another set of benign models, named in its
    stats: for a feature whose values exist for only some of the fit's models (L_p, from the patch probe, for models
    scanned before it was recorded and no longer on disk)."""
    if feature not in FEATURES or feature in REQUIRED_FEATURES:
        raise TerdError(f"only an optional feature can be fitted apart ({', '.join(f for f in FEATURES if f not in REQUIRED_FEATURES)})")
    if len(values) != len(models) or len(values) < 2:
        raise TerdError(f"fitting {feature} needs one value per model and at least 2 models, got {len(values)}")
    mean, std = statistics.fmean(values), statistics.stdev(values)
    stats = {**thresholds.provenance.get("stats", {}), feature: {"mean": mean, "std": std, "values": list(values),
                                                                  "models": list(models)}}
    vals = {**thresholds.values(), feature: mean + k * std}
    return Thresholds.of(vals, {**thresholds.provenance, "stats": stats})


@dataclass
class ModelVerdict:
    verdict: str  # "backdoored" | "benign" | "uncalibrated"
    scores: dict[str, float]
    thresholds: dict[str, float] | None
    margin: dict[str, float] | None  # score - threshold: > 0 = over the threshold (backdoor side)
    margin_std: dict[str, float] | None  # the margin in benign standard deviations, when known
    flagged_by: list[str]
    unscored: list[str] = field(default_factory=list)  # thresholded features the scores lack (an older scan)

    @property
    def backdoored(self) -> bool:
        return self.verdict == "backdoored"

    def to_dict(self) -> dict:
        return asdict(self)


def detect_model(trigger_or_features: Trigger | dict[str, float], thresholds: Thresholds | None) -> ModelVerdict:
    """Apply the decision rule; without thresholds the verdict is "uncalibrated" (scores only).

    Scores must hold the required features; a thresholded optional feature they lack (P_r, L_p or W_p, for scores
    from a scan made before it existed or without the probe) cannot be judged and is listed in ``unscored`` rather than silently skipped."""
    scores = kl_features(trigger_or_features) if isinstance(trigger_or_features, Trigger) else dict(trigger_or_features)
    if missing := [f for f in REQUIRED_FEATURES if f not in scores]:
        raise TerdError(f"scores lack {', '.join(missing)} (have: {', '.join(scores) or 'none'})")
    if thresholds is None:
        return ModelVerdict("uncalibrated", scores, None, None, None, [])
    thr = {f: v for f, v in thresholds.values().items() if f in scores}
    unscored = [f for f in thresholds.values() if f not in scores]
    margin = {f: scores[f] - thr[f] for f in thr}
    stats = thresholds.provenance.get("stats", {})
    margin_std = {f: margin[f] / stats[f]["std"] for f in thr if stats.get(f, {}).get("std")} or None
    flagged = [f for f in thr if margin[f] > 0]
    return ModelVerdict("backdoored" if flagged else "benign", scores, thr, margin, margin_std, flagged, unscored)
