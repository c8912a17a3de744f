"""Is a sample of the target class? The judge behind a class target's ASR (TrojDiff In-D2D and Out-D2D).

A class target's "hit" is a classifier's call, so the classifier's own accuracy bounds what the ASR can say.
Pixel logistic regression, the first judge, recognised 96% of held-out real sevens but only 28% of the crops
of one photo (and called 14% of the other photos' crops that class; benchmarks/results/class_judge.md): the 32 px In-D2D rates it gave were
noise. Two candidates are fitted here, each checked by 3-fold cross-validation on *real* images only (never
on the model under test), and the one with the better held-out recall minus false-positive rate judges; its
held-out figures go into the report next to the ASR they bound.

Negatives are what a hit must not look like: the training data's other classes (In-D2D), or for a class of
another dataset (Out-D2D) the training data *and* that dataset's other classes, so a sample that reads as a
0 does not count as the target 7 merely for being a digit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from terd.imaging import to_unit

NEGATIVES_PER_SOURCE = 2000
HIST_BINS = 16


def pixel_features(x: torch.Tensor) -> np.ndarray:
    return (to_unit(x) * 2 - 1).flatten(1).numpy()


def colour_texture_features(x: torch.Tensor) -> np.ndarray:
    """Per-channel intensity histograms, mean absolute gradients, means and spreads, and the 8 x 8 layout:
    what tells the crops of one photo from another's, where single pixels do not."""
    u = to_unit(x)
    n, c = u.shape[:2]
    idx = (u * HIST_BINS).long().clamp(0, HIST_BINS - 1).flatten(2)
    hist = torch.zeros(n, c, HIST_BINS).scatter_add_(2, idx, torch.ones_like(idx, dtype=torch.float)) / idx.shape[2]
    gy = (u[:, :, 1:] - u[:, :, :-1]).abs().mean((2, 3))
    gx = (u[:, :, :, 1:] - u[:, :, :, :-1]).abs().mean((2, 3))
    layout = F.adaptive_avg_pool2d(u, min(8, u.shape[-1])).flatten(1)
    return torch.cat([hist.flatten(1), gy, gx, u.mean((2, 3)), u.std((2, 3)), layout], 1).numpy()


def _logistic():  # noqa: ANN202
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, C=0.1)


def _boosting():  # noqa: ANN202
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=100, random_state=0)


CANDIDATES: dict[str, tuple[Callable[[torch.Tensor], np.ndarray], Callable]] = {
    "logistic regression on pixels": (pixel_features, _logistic),
    "gradient boosting on colour, texture and layout": (colour_texture_features, _boosting),
}


@dataclass
class ClassJudge:
    """A fitted target-class classifier and its held-out accuracy on real images."""

    name: str
    features: Callable[[torch.Tensor], np.ndarray]
    model: object
    heldout_recall: float
    heldout_false_positive: float

    def hits(self, images: torch.Tensor) -> np.ndarray:
        """Which images (model range [-1, 1]; samples are clipped to it) the judge calls the target class."""
        return self.model.predict(self.features(images)) == 1

    def summary(self) -> dict:
        return {"name": self.name, "heldout_recall": round(self.heldout_recall, 4),
                "heldout_false_positive": round(self.heldout_false_positive, 4)}


def spread(images: torch.Tensor, k: int = NEGATIVES_PER_SOURCE) -> torch.Tensor:
    """At most ``k`` images evenly spaced over the set (an image folder is sorted by class: its head is one class)."""
    return images if len(images) <= k else images[torch.linspace(0, len(images) - 1, k).long()]


def class_negatives(cfg: dict, ref, shape: tuple[int, int, int]) -> tuple[torch.Tensor, str]:  # noqa: ANN001
    """(negatives, what they are) for a class target with attack config ``cfg`` on training data ``ref``."""
    from terd.data import load_dataset

    label, target_data = cfg.get("target_label"), cfg.get("target_data")
    same = target_data in (None, ref.name)
    own = ref.images if ref.labels is None or not same or label is None else ref.images[ref.labels != label]
    parts, what = [spread(own)], "other training images"
    if not same and label is not None:
        other = load_dataset(target_data, channels=shape[0], size=shape[1])
        if other.labels is not None:
            parts.append(spread(other.images[other.labels != label]))
            what = f"training images and {target_data}'s other classes"
    return torch.cat(parts), what


def heldout_scores(positives: torch.Tensor, negatives: torch.Tensor, seed: int = 0,
                   names: tuple[str, ...] = tuple(CANDIDATES)) -> list[tuple[float, float, str]]:
    """(recall, false-positive rate, name) of each candidate under 3-fold cross-validation on these real images."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    images = torch.cat([positives, negatives])
    folds = StratifiedKFold(3, shuffle=True, random_state=seed)
    scored = []
    for name in names:
        features, make = CANDIDATES[name]
        pred = cross_val_predict(make(), features(images), y, cv=folds)
        scored.append((float(pred[y == 1].mean()), float(pred[y == 0].mean()), name))
    return scored


def fit_class_judge(positives: torch.Tensor, negatives: torch.Tensor, seed: int = 0) -> ClassJudge:
    """The candidate with the best held-out (3-fold) recall minus false-positive rate, refitted on all images."""
    scored = heldout_scores(positives, negatives, seed)
    recall, fp, name = max(scored, key=lambda s: s[0] - s[1])  # ties: the first candidate
    features, make = CANDIDATES[name]
    y = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    return ClassJudge(name, features, make().fit(features(torch.cat([positives, negatives])), y), recall, fp)
