"""Where a fine-tuning step's time goes, per batch size, and whether bfloat16 autocast pays on this CPU.

Two questions from the attacks issue's 5-minute budget (quick_finetune_photos32.md):

* Is a batch-16 epoch slower than a batch-64 one because of per-step overhead (Adam, gradient clipping,
  EMA), or was the 90-123 s per batch-16 epoch recorded there machine drift? Each part of train()'s step is
  timed on its own (median over repeats) at batch 16 and 64, and per image.
* Does ``torch.autocast("cpu", dtype=torch.bfloat16)`` speed up the forward+backward (training, reversion)
  or the no-grad forward (sampling, scanning)? This CPU reports AMX-BF16. Timed interleaved with fp32.

Run alone (nothing else on the CPU): .venv/bin/python benchmarks/bench_step_cost.py
(writes benchmarks/results/step_cost.{json,md})
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds_interleaved, write_results  # noqa: E402

from terd.presets import get_preset  # noqa: E402
from terd.train import EMA  # noqa: E402

REPEATS = 9
PARTS = ("forward", "backward", "clip", "adam", "ema")


def step_parts(unet: UNet2DModel, batch: int) -> dict:
    """Median ms of each part of one training step (as in terd.train.train), over REPEATS steps."""
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    ema = EMA(unet, 0.999)
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x, t = torch.randn(shape), torch.randint(0, 1000, (batch,))
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    for i in range(REPEATS + 2):
        marks = [time.perf_counter()]
        loss = F.mse_loss(unet(x, t).sample, x)
        marks.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        marks.append(time.perf_counter())
        opt.step()
        marks.append(time.perf_counter())
        ema.update(unet)
        marks.append(time.perf_counter())
        if i >= 2:  # warm-up
            for p, a, b in zip(PARTS, marks, marks[1:], strict=False):
                times[p].append(b - a)
    ms = {p: round(1000 * statistics.median(v), 1) for p, v in times.items()}
    total = sum(ms.values())
    return {**ms, "step_ms": round(total, 1), "per_image_ms": round(total / batch, 2),
            "overhead_share": round((ms["clip"] + ms["adam"] + ms["ema"]) / total, 3)}


def autocast_rows(unet: UNet2DModel, batch: int) -> dict:
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x, t = torch.randn(shape), torch.randint(0, 1000, (batch,))

    def fwd_bwd(bf16: bool):  # noqa: ANN202
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = unet(x, t).sample
            F.mse_loss(out.float(), x).backward()
            unet.zero_grad(set_to_none=True)
        return run

    def fwd(bf16: bool):  # noqa: ANN202
        @torch.no_grad()
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                unet(x, t)
        return run

    fb32, fb16, f32, f16 = median_seconds_interleaved([fwd_bwd(False), fwd_bwd(True), fwd(False), fwd(True)],
                                                      repeats=REPEATS)
    with torch.no_grad():
        ref = unet(x, t).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = unet(x, t).sample.float()
    rel = ((low - ref).norm() / ref.norm()).item()
    return {"fwd_bwd_fp32_ms": round(1000 * fb32, 1), "fwd_bwd_bf16_ms": round(1000 * fb16, 1),
            "fwd_bwd_speedup": round(fb32 / fb16, 2), "fwd_fp32_ms": round(1000 * f32, 1),
            "fwd_bf16_ms": round(1000 * f16, 1), "fwd_speedup": round(f32 / f16, 2),
            "bf16_relative_error": round(rel, 4)}


def main() -> None:
    rows = []
    for preset_name in ("tiny-digits16", "tiny-photos32"):
        preset = get_preset(preset_name)
        torch.manual_seed(0)
        unet = UNet2DModel(**preset.unet_config()).train()
        for batch in (16, 64):
            row = {"preset": preset_name, "batch": batch, **step_parts(unet, batch), **autocast_rows(unet, batch)}
            print(row, flush=True)
            rows.append(row)
    columns = ["preset", "batch", *PARTS, "step_ms", "per_image_ms", "overhead_share", "fwd_bwd_fp32_ms",
               "fwd_bwd_bf16_ms", "fwd_bwd_speedup", "fwd_fp32_ms", "fwd_bf16_ms", "fwd_speedup",
               "bf16_relative_error"]
    notes = (f"Medians over {REPEATS} repeats, ms. Step parts as in terd.train.train (forward includes the MSE loss; "
             "overhead_share = (clip + adam + ema) / step). Autocast columns: forward+backward and no-grad "
             "forward, fp32 and torch.autocast('cpu', bfloat16) timed interleaved; bf16_relative_error = "
             "||eps_bf16 - eps_fp32|| / ||eps_fp32|| of one forward (randomly initialised network).")
    print(write_results("step_cost", rows, columns, notes))


if __name__ == "__main__":
    main()
