"""Foundation speed on this machine, per tiny preset: training epoch time, DDIM-50 sampling throughput,
and forward+backward time of a batch of 16 with weights frozen (what trigger reversion needs) vs not.

Run: .venv/bin/python benchmarks/bench_foundation.py   (writes benchmarks/results/foundation.{json,md})
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, write_results  # noqa: E402

from terd.data import load_dataset  # noqa: E402
from terd.models import Denoiser, NoiseSchedule  # noqa: E402
from terd.presets import get_preset  # noqa: E402
from terd.sampling import ddim_sample  # noqa: E402
from terd.train import train  # noqa: E402


def fwd_bwd_ms(den: Denoiser, frozen: bool) -> float:
    den.network.requires_grad_(not frozen)
    x = torch.randn(16, *den.image_shape)
    t = torch.randint(0, 1000, (16,))
    r = torch.zeros(1, *den.image_shape, requires_grad=True)

    def step() -> None:
        loss = den(x + r, t).square().mean()
        loss.backward()
        den.network.zero_grad(set_to_none=True)
        r.grad = None

    return 1000 * median_seconds(step, repeats=10, warmup=2)


def main() -> None:
    rows = []
    for name in ("tiny-digits16", "tiny-photos32"):
        p = get_preset(name)
        torch.manual_seed(0)
        den = Denoiser(UNet2DModel(**p.unet_config()).eval(), NoiseSchedule.linear(), (p.channels, p.size, p.size))
        ds = load_dataset(p.dataset, channels=p.channels, size=p.size)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train(p, ds, Path(tmp) / "m", epochs=2, progress=False, grid_size=0)
            epoch_s = (time.perf_counter() - t0) / 2
        x_T = torch.randn(64, *den.image_shape)
        with torch.no_grad():
            ddim_s = median_seconds(lambda d=den, x=x_T: ddim_sample(d, x, steps=50), repeats=3)
        frozen, unfrozen = fwd_bwd_ms(den, True), fwd_bwd_ms(den, False)
        rows.append({"preset": name, "parameters": den.num_parameters(), "train_images": len(ds),
                     "epoch_seconds": round(epoch_s, 2), "ddim50_images_per_s": round(64 / ddim_s, 1),
                     "fwd_bwd_b16_frozen_ms": round(frozen, 1), "fwd_bwd_b16_unfrozen_ms": round(unfrozen, 1),
                     "frozen_saving": f"{100 * (1 - frozen / unfrozen):.0f}%"})
        print(rows[-1])
    write_results("foundation", rows, list(rows[0]),
                  notes="Epoch time = 2 epochs timed once (includes saving); sampling and fwd+bwd are medians.")


if __name__ == "__main__":
    main()
