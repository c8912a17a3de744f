"""Which candidate triggers input detection should use when a verdict shows a patch: the patch probe's, and only
those reversion candidates with an image-wide anomaly of their own.

Why: input detection splits its false-positive budget evenly over a scan's candidates (union bound), so every
candidate that is not the trigger costs the real one power. Its screen -- a candidate "could be a trigger" when
its detector catches at least half of its own inputs -- keeps ordinary candidates: a benign digits16 model's first
reversion candidate catches 0.882-0.977 of its own inputs, and both of a tiny-photos32-dc model's catch all of them
(zoo-tiny's saved candidates; candidate_choice.md). On a TrojDiff patch model the reversion candidates also cross the peak-KL threshold P_r at the
patch itself: they find its place, not its value (window means r -0.55 to -2.66, gamma 0.90-1.01, where the trigger
is +0.9 with gamma 0.1), and took half of the budget from the probe's candidate, which reads the patch's value from the
model. So when the verdict's thresholds put the probe over (L_p or W_p), the probe's candidate stands for the
small trigger, and a reversion candidate keeps a share only when its image-wide features (M_r, V_r), read outside
the probe's window, cross their thresholds. (Read outside the window, P_r still implicated one of zoo-tiny's
three digits16 patch models' reversion candidates, by a bump at the image border 1.03x its threshold.)

Only then: on other flagged models a threshold screen could drop a real trigger's candidate whose own features sit
under the cuts while another candidate's cross them (on photos32 TrojDiff's blend the candidate that catches every
backdoor input is not the one with the largest M_r: candidate_set.md); the any-candidate screen keeps both.
"""

from __future__ import annotations

import torch

from terd.defense.model_detection import MODEL_FEATURES, kl_features
from terd.defense.trigger import Trigger

WIDE = ("M_r", "V_r")  # the image-wide KL features (P_r is the local one)


def trigger_window(trigger: Trigger) -> torch.Tensor:
    """Where a candidate differs from benign noise N(0, 1) (bool, C x H x W): the patch probe's window."""
    return (trigger.r != 0) | (trigger.gamma != 1)


def features_outside(trigger: Trigger, window: torch.Tensor) -> dict[str, float]:
    """The candidate's KL features with ``window`` read as benign noise (KL 0 there)."""
    return kl_features(Trigger(torch.where(window, 0.0, trigger.r), torch.where(window, 1.0, trigger.gamma)))


def implicated_candidates(candidates: list[Trigger], cuts: dict[str, float] | None, probe_index: int | None,
                          model_features: dict[str, float]) -> list[int]:
    """Indices of the candidates input detection uses on a model whose verdict's thresholds ``cuts`` ({feature:
    threshold}) put the patch probe over (L_p or W_p in ``model_features`` over its cut): the probe's candidate
    (``probe_index``) and every reversion candidate whose M_r or V_r, read outside the probe's window, is over its
    cut. Empty otherwise -- no cuts (an uncalibrated or benign verdict), no probe candidate, the probe under its
    cuts: callers then keep every candidate that could be a trigger, as before."""
    if not cuts or probe_index is None:
        return []
    if not any(f in cuts and model_features.get(f) is not None and model_features[f] > cuts[f] for f in MODEL_FEATURES):
        return []
    window = trigger_window(candidates[probe_index])
    wide = [i for i, cand in enumerate(candidates) if i != probe_index
            and any(f in cuts and v > cuts[f] for f, v in features_outside(cand, window).items() if f in WIDE)]
    return sorted([*wide, probe_index])
