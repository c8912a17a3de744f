"""Input-detection throughput: the LLR score vs a plain matrix-vector product over the same inputs.

The floor for any per-input detector is reading each input once, which is what ``x @ r`` does. The goal
(issue #4) is an LLR within 2x of that. Both run on the same float32 batch already in memory; the LLR
includes its per-dimension gamma (quadratic term, the fused `terd.defense.llr_kernel` on CPU) unless
gamma == 1, where it IS a matvec plus a constant. The candidate-set detector (two kept candidates, what a scan
uses on TrojDiff-like models) is timed too: both candidates score each input in one read of it.
Reported: inputs per second from medians of 15 repeats after a warm-up, and the time ratio. The two are
timed alternately (LLR, matvec, LLR, ...) so that load drifting on a shared machine hits both alike.

Run: .venv/bin/python benchmarks/bench_input_detection.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds_interleaved, write_results  # noqa: E402

from terd.defense.input_detection import CandidateSetDetector, InputDetector  # noqa: E402
from terd.defense.trigger import Trigger  # noqa: E402

CASES = [((1, 16, 16), 20_000), ((3, 32, 32), 20_000), ((3, 64, 64), 5_000), ((3, 256, 256), 500)]


GAMMAS = ("1", "learned (0.5-1)", "2 candidates, learned")


def measure(shape: tuple[int, int, int], n: int, gamma_kind: str) -> dict:
    """One shape and detector: a trigger with gamma = 1, one with a learned gamma, or the candidate set of two
    learned-gamma triggers (both kept, scored together in one pass over the inputs)."""
    g = torch.Generator().manual_seed(0)
    r = torch.randn(shape, generator=g)
    learned = torch.rand(shape, generator=g) * 0.5 + 0.5
    if gamma_kind == GAMMAS[2]:
        second = Trigger(torch.randn(shape, generator=g), torch.rand(shape, generator=g) * 0.5 + 0.5)
        det = CandidateSetDetector([Trigger(r, learned), second], fpr=1e-3, min_own_tpr=0.0)
    else:
        det = InputDetector(r, learned if gamma_kind == GAMMAS[1] else torch.ones(shape), fpr=1e-3)
    x = torch.randn((n, *shape), generator=g)
    flat, rf = x.flatten(1), r.flatten()
    t_llr, t_mv = median_seconds_interleaved([lambda: det.is_backdoor(x), lambda: flat @ rf], repeats=15)
    return {"shape": "x".join(map(str, shape)), "gamma": gamma_kind, "n": n,
            "llr_inputs_per_s": round(n / t_llr), "matvec_inputs_per_s": round(n / t_mv),
            "time_ratio": round(t_llr / t_mv, 2)}


def main() -> None:
    rows = [measure(shape, n, kind) for shape, n in CASES for kind in GAMMAS]
    for row in rows:
        print(row, flush=True)
    write_results("input_detection_throughput", rows,
                  ["shape", "gamma", "n", "llr_inputs_per_s", "matvec_inputs_per_s", "time_ratio"],
                  notes="time_ratio = median LLR decision time / median `x @ r` time over the same float32 inputs "
                        "(goal: <= 2). The LLR decision includes the comparison with the FPR-1e-3 threshold. Learned gamma "
                        "runs the fused numba kernel (one read of each input, four rows per pass). '2 candidates': the scan's "
                        "candidate-set detector with two kept candidates, "
                        "both scored in one pass over the inputs (the multi-form kernel).")


if __name__ == "__main__":
    main()
