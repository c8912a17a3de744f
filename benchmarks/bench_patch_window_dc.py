"""Why the patch probe misses the TrojDiff patch on tiny-photos32-dc models: where their residual spread stands out.

The probe (terd.defense.patch_probe) marks a window where the residual eps_theta(x, T-1) - x over benign noise
varies more than RATIO_CUT times the median element's. In bench_photos32dc_mini it marked corner pixels on every
dc model, benign ones included, and the patch model's input TPR stayed at 0.0001. The first guess was the dc
models' image-mean response (offset-noise training); this script tests it by taking the spread with the residual's
per-image mean and per-channel mean removed as well, and reports, per model and variant, the mean spread ratio on
TrojDiff's patch (the bottom-right 3 x 3 in every channel), on the four corner pixels, and the largest ratio
outside both. A second statistic from the same draws, not used by the probe: the residual's *mean* per element,
as a robust z over elements (median, MAD), and how many of its 8 largest |z| fall on the patch. Forward passes
only (512 noises per model, the probe's own count and draw).
Run: .venv/bin/python benchmarks/bench_patch_window_dc.py [CACHE]   (default runs/zoo-cache, p32dc-* models)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.attacks.triggers import patch_mask  # noqa: E402
from terd.defense.patch_probe import RESPONSE_NOISES, _at_last_t  # noqa: E402

RATIO_CUT = 4.0  # the first probe's window cut (spread over the median element's), replaced since by localized components
from terd.models import load_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"raw": lambda r: r, "minus image mean": lambda r: r - r.mean(dim=(1, 2, 3), keepdim=True),
            "minus channel mean": lambda r: r - r.mean(dim=(2, 3), keepdim=True)}


@torch.no_grad()
def residuals(den, n: int = RESPONSE_NOISES) -> torch.Tensor:  # noqa: ANN001
    gen = torch.Generator().manual_seed(17)  # the probe's seed-0 draw
    out = []
    for start in range(0, n, 256):
        x = torch.randn((min(256, n - start), *den.image_shape), generator=gen)
        out.append(_at_last_t(den, x) - x)
    return torch.cat(out)


def main() -> None:
    cache = ROOT / (sys.argv[1] if len(sys.argv) > 1 else "runs/zoo-cache")
    rows = []
    for path in sorted(cache.glob("p32dc-*")):
        if not (path / "model_index.json").is_file():
            continue
        den = load_denoiser(path)
        c, h, w = den.image_shape
        corners = torch.zeros(c, h, w, dtype=torch.bool)
        corners[:, [0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]] = True
        patch = patch_mask(c, h).bool() & ~corners  # the patch's own corner pixel counts as a corner
        res = residuals(den)
        mean = res.mean(0)
        z = (mean - mean.median()) / (1.4826 * (mean - mean.median()).abs().median())
        top8 = z.abs().flatten().topk(8).indices
        mean_cols = {"mean_z_patch": round(float(z[patch].abs().mean()), 2),
                     "mean_z_corner": round(float(z[corners].abs().mean()), 2),
                     "mean_z_max": round(float(z.abs().max()), 2),
                     "mean_top8_on_patch": int(patch.flatten()[top8].sum())}
        for variant, fn in VARIANTS.items():
            spread = fn(res).std(0)
            ratio = spread / spread.median()
            rows.append({"model": path.name, "has_patch_trigger": "patch" in path.name, "variant": variant,
                         "patch_mean_ratio": round(float(ratio[patch].mean()), 3),
                         "patch_max_ratio": round(float(ratio[patch].max()), 3),
                         "corner_mean_ratio": round(float(ratio[corners].mean()), 3),
                         "other_max_ratio": round(float(ratio[~(patch | corners)].max()), 3),
                         "elements_over_cut": int((ratio > RATIO_CUT).sum()),
                         "patch_elements_over_cut": int((ratio[patch] > RATIO_CUT).sum()),
                         **(mean_cols if variant == "raw" else {})})
            print(rows[-1], flush=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    write_results("patch_window_dc", rows, cols, notes=(
        f"Spread ratio = per-element std of eps_theta(x, T-1) - x over {RESPONSE_NOISES} benign unit noises, over "
        f"the median element's (the probe's window statistic; its cut is {RATIO_CUT:g}). patch: TrojDiff's "
        "bottom-right 3 x 3 in every channel less its corner pixel (24 elements); corners: the four corner pixels in every channel (12); "
        "other: every remaining element. Variants remove the residual's per-image or per-channel mean before the "
        "spread (the offset-noise hypothesis). mean_z_*: mean |robust z| of the residual's per-element mean on the "
        "patch / corners, and its largest; mean_top8_on_patch: how many of the 8 largest |z| are patch elements. "
        "Models: the dc zoo cache (bench_photos32dc_mini's models)."))


if __name__ == "__main__":
    main()
