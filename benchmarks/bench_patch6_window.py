"""Why the patch probe misses the larger TrojDiff patches (3 x 3 at 16 px, 6 x 6 at 32 px), and what it would take.

bench_digits16_patch_shapes: on the patch-6 model (3 x 3 white patch, bottom-right; ASR 0.98) the probe's first look
finds no localized response (leading support 168.7 of 256 elements, L_p 1.52), so it offers no input-detection
candidate, and the reversion lands on the patch with the wrong sign and gamma ~1 (P_r flags the model; input TPR
0.0). This asks whether the probe's second look, the excess explained offset on a window over its mirrored control
(patch_probe.excess_offsets, the coarse grid, 32 noises per value, the probe's seed-0 draws), would read the
trigger given a window: the true window, the 2 x 2 window where the reversion's KL peaks (P_r's), and a 2 x 2
window elsewhere; on the patch model and on its clean base. The same for the 6 x 6 patch on tiny-photos32-dc
(bench_photos32dc_patch_shapes: ASR 1.00, every feature under its cut, input TPR 0.0001), and for the 6 x 6 patch on
base s5 that the probe's search missed (bench_photos32dc_wp_heldout): its true window and the search's. Forward passes
only.

Models: bench_digits16_patch_shapes' and bench_photos32dc_patch_shapes' (terd bench --zoo
benchmarks/zoo-digits16-patch-shapes.yaml --build-only --cache runs/zoo-cache; likewise the dc zoo).
Run: .venv/bin/python benchmarks/bench_patch6_window.py   -> results/patch6_window.{json,md}
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.defense.patch_probe import (  # noqa: E402
    COARSE_GRID,
    VALUE_NOISES,
    box_window,
    excess_offsets,
    probe_generator,
)
from terd.models import load_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs/zoo-cache"
PR_PEAK_16 = "reversion's KL peak 2x2 (13-14)"
PR_PEAK_32 = "reversion's KL peak 2x2 (27-28)"
WINDOWS_16 = {"true 3x3 (rows/cols 13-15)": ((13, 16), (13, 16)), PR_PEAK_16: ((13, 15), (13, 15)),
              "2x2 elsewhere (2-3)": ((2, 4), (2, 4))}
WINDOWS_32 = {"true 6x6 (rows/cols 26-31)": ((26, 32), (26, 32)), PR_PEAK_32: ((27, 29), (27, 29)),
              "2x2 elsewhere (2-3)": ((2, 4), (2, 4))}
# bench_photos32dc_wp_heldout (after the shape rule): on base s5 the search settled on a central window, W_p 0.213
WINDOWS_32_S5 = {"true 6x6 (rows/cols 26-31)": ((26, 32), (26, 32)),
                 "the search's window (rows 13-18, cols 12-19)": ((13, 19), (12, 20))}
MODELS = (("patch-6 D2I, 16 px (ASR 0.98)", "d16-troj-d2i-patch6-s30-37", WINDOWS_16),
          ("its clean base", "d16-benign-s30-e22", WINDOWS_16),
          ("patch-6 D2I, dc 32 px (ASR 1.00)", "p32dc-troj-d2i-patch6-s4-42", WINDOWS_32),
          ("its clean base", "p32dc-benign-s4-e12", WINDOWS_32),
          ("patch-6 D2I, dc 32 px, base s5 (ASR 1.00)", "p32dc-troj-d2i-patch6-s5-62", WINDOWS_32_S5),
          ("its clean base", "p32dc-benign-s5-e12", WINDOWS_32_S5))


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for role, name, windows in MODELS:
        if not (CACHE / name / "model_index.json").is_file():
            raise SystemExit(f"{CACHE / name} is missing: build it first (see the docstring)")
        den = load_denoiser(CACHE / name).freeze()
        for label, (r, c) in windows.items():
            with torch.no_grad():
                ex = excess_offsets(den, box_window(den.image_shape, (*r, *c)), probe_generator(0), COARSE_GRID, VALUE_NOISES)
            best = max(range(len(ex)), key=ex.__getitem__)
            rows.append({"model": f"{name} ({role})", "window": label, "peak at v": COARSE_GRID[best],
                         "excess explained offset": round(ex[best], 3)})
            print(rows[-1], flush=True)
    note = ("Excess explained offset: the window's explained offset (v - its mean eps_theta at t = T-1, window set to "
            "v + 0.1 eps) less its control window's, at its peak over the probe's coarse grid -3..3. The trigger's "
            "value is 0.9 (TrojDiff's (1 - 0.1) x white).")
    write_results("patch6_window", rows, ["model", "window", "peak at v", "excess explained offset"], notes=note)


if __name__ == "__main__":
    main()
