"""How well does each class-target judge know the target class on real images? (what bounds a class ASR)

    .venv/bin/python benchmarks/bench_class_judge.py     -> benchmarks/results/class_judge.{json,md}

For the four class targets terd's attacks use by default (In-D2D and Out-D2D on each built-in dataset), the
3-fold held-out recall on real target-class images and false-positive rate on real negatives of:
the judge used before 2026-12-05 (pixel logistic regression against the training images only, the first
2,000), and each candidate of ``terd.attacks.class_judge`` against its negatives (for Out-D2D those include
the target dataset's other classes); ``chosen`` marks the one ``fit_class_judge`` keeps.
"""

from __future__ import annotations

from common import write_results

from terd.attacks.build import DEFAULT_TARGET_CLASS
from terd.attacks.class_judge import class_negatives, heldout_scores
from terd.data import load_dataset

SHAPES = {"digits16": (1, 16, 16), "photos32": (3, 32, 32)}
OLD = "logistic regression on pixels"


def main() -> None:
    rows = []
    for data, shape in SHAPES.items():
        ref = load_dataset(data, channels=shape[0], size=shape[1])
        for target_data in SHAPES:  # In-D2D (the model's own data), Out-D2D (the other dataset)
            label = DEFAULT_TARGET_CLASS[target_data]
            setting = "in-d2d" if target_data == data else "out-d2d"
            tgt = load_dataset(target_data, channels=shape[0], size=shape[1])
            positives = tgt.of_class(label)
            old_neg = (ref.images[ref.labels != label] if setting == "in-d2d" else ref.images)[:2000]
            (r, f, _), = heldout_scores(positives, old_neg, names=(OLD,))
            case = {"model data": data, "setting": setting, "target": f"{target_data}:{label}"}
            rows.append({**case, "judge": f"before 2026-12-05: {OLD}, training images only", "negatives": "training images",
                         "recall": round(r, 3), "false positives": round(f, 4), "chosen": ""})
            negatives, what = class_negatives({"target_data": target_data, "target_label": label}, ref, shape)
            scored = heldout_scores(positives, negatives)
            best = max(scored, key=lambda s: s[0] - s[1])
            for r, f, name in scored:
                rows.append({**case, "judge": name, "negatives": what, "recall": round(r, 3),
                             "false positives": round(f, 4), "chosen": "yes" if (r, f, name) == best else ""})
            print(rows[-len(scored) - 1:], flush=True)
    print(write_results("class_judge", rows, ["model data", "setting", "target", "judge", "negatives", "recall",
                                              "false positives", "chosen"]))


if __name__ == "__main__":
    main()
