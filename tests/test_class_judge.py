"""The class-target judge: checked on real images, and strict about what counts as the target class."""

import torch

from terd.attacks.class_judge import class_negatives, fit_class_judge, spread
from terd.data import load_dataset


def test_out_d2d_negatives_include_the_target_datasets_other_classes():
    """A digit 7 as the target of a photos model: a sample that reads as another digit is not a hit."""
    photos = load_dataset("photos32", channels=1, size=16)
    digits = load_dataset("digits16", channels=1, size=16)
    cfg = {"target_data": "digits16", "target_label": 7}
    negatives, what = class_negatives(cfg, photos, (1, 16, 16))
    assert "digits16's other classes" in what
    assert len(negatives) == 2000 + int((digits.labels != 7).sum())  # 2,000 photos (evenly spread), all other digits
    judge = fit_class_judge(digits.of_class(7), negatives)
    assert judge.heldout_recall > 0.8 and judge.heldout_false_positive < 0.02
    zeros = digits.of_class(0)
    assert judge.hits(zeros).mean() < 0.05  # real zeros are digits, not sevens


def test_in_d2d_judge_recognises_one_photos_crops():
    """Pixel logistic regression knew 28% of held-out crops of photo 4 (class_judge.md); the judge picks features that do."""
    photos = load_dataset("photos32")
    negatives, what = class_negatives({"target_data": "photos32", "target_label": 4}, photos, (3, 32, 32))
    assert what == "other training images" and not (negatives.unsqueeze(1) == photos.of_class(4)[:5]).flatten(2).all(2).any()
    judge = fit_class_judge(photos.of_class(4), negatives)
    assert judge.name.startswith("gradient boosting")
    assert judge.heldout_recall > 0.9 and judge.heldout_false_positive < 0.02
    assert judge.summary()["heldout_recall"] == round(judge.heldout_recall, 4)


def test_spread_takes_evenly_spaced_images():
    x = torch.arange(10.0).view(10, 1, 1, 1)
    assert spread(x, 4).flatten().tolist() == [0.0, 3.0, 6.0, 9.0]
    assert spread(x, 20) is x
