"""Is the demo's input-detection false-positive rate really <= its 0.1% target?

`make demo` flags 28 of its 20,000 benign noises (0.14%) with the backdoored model's candidate set, 1.8
standard deviations over the target. This measures the same detector on 2,000,000 fresh benign noises, per
candidate (each works at 0.05%, the union bound's even share) and for the set, next to the closed-form rates.

Run: make demo, then .venv/bin/python benchmarks/bench_demo_fpr.py [CANDIDATES] → demo_fpr.md / .json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.defense import load_input_detector  # noqa: E402

N, CHUNK, SEED = 2_000_000, 10_000, 7


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output/backdoored/candidates.safetensors")
    if not path.is_file():
        raise SystemExit(f"{path}: no candidates file (run `make demo` first)")
    det = load_input_detector(path, fpr=1e-3)
    g = torch.Generator().manual_seed(SEED)
    per = [0] * len(det.detectors)
    union = 0
    for _ in range(N // CHUNK):
        x = torch.randn(CHUNK, *det.detectors[0].r.shape, generator=g)
        flags = [d.is_backdoor(x) for d in det.detectors]
        per = [c + int(f.sum()) for c, f in zip(per, flags, strict=True)]
        union += int(torch.stack(flags).any(0).sum())
    rows = [{"detector": f"candidate {i}", "closed_form_fpr": round(d.false_positive_rate(), 7), "flagged": c,
             "measured_fpr": round(c / N, 7), "sd_from_closed_form": round((c - d.false_positive_rate() * N)
                                                                         / (d.false_positive_rate() * N) ** 0.5, 2)}
            for i, (d, c) in enumerate(zip(det.detectors, per, strict=True))]
    bound = det.false_positive_bound()
    rows.append({"detector": "set (any candidate)", "closed_form_fpr": f"<= {bound:.4g} (union bound)",
                 "flagged": union, "measured_fpr": round(union / N, 7), "sd_from_closed_form": ""})
    write_results("demo_fpr", rows, ["detector", "closed_form_fpr", "flagged", "measured_fpr", "sd_from_closed_form"],
                  notes=f"{N:,} benign unit noises (seed {SEED}) through the demo's candidate-set detector ({path}).")
    print(rows)


if __name__ == "__main__":
    main()
