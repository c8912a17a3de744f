"""Does offset noise in pretraining teach the tiny photos32 network its input's mean?

dc_gain.md found the photos32 base blind to the mean (DC) of its input (gain ~0.01 where ~1 is right near t = T),
which makes unclipped DDPM, BadDiffusion's sampler, diverge; 200 fine-tuning steps with offset noise or a
DC-weighted loss did not change it, and 8 norm groups instead of 32 raised it only to 0.06. This script trains
bases from scratch with offset noise (a per-image, per-channel constant ~ N(0, s^2) added to the training noise,
``terd.train.train(offset_noise=s)``) and records, per variant: the DC gain at t = 999 / 700 / 500, the pixel
spread of unclipped 1000-step DDPM samples (the data's is 0.60; the recorded base ends at ~5.5), the share of
final pixels outside [-1, 1], and the training seconds.

One variant per call, so two can train side by side at one thread each:

    .venv/bin/python benchmarks/bench_offset_noise.py train g32-o0.1 --threads 1
    .venv/bin/python benchmarks/bench_offset_noise.py probe g32-o0.1     # gains of the checkpoint mid-training
    .venv/bin/python benchmarks/bench_offset_noise.py table              # re-render the table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dc_gain import eps_of, gains  # noqa: E402
from common import machine, write_results  # noqa: E402

from terd.data import load_dataset  # noqa: E402
from terd.models import load_denoiser  # noqa: E402
from terd.presets import get_preset  # noqa: E402
from terd.sampling import ddpm_sample  # noqa: E402
from terd.train import STATE_FILE, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "offset-noise"
RESULTS = ROOT / "benchmarks" / "results" / "offset_noise.json"
VARIANTS = {  # name: (offset noise std, norm groups, epochs)
    "g32-o0.1": (0.1, 32, 20),
    "g8-o0.1": (0.1, 8, 20),
    "g32-o0.2": (0.2, 32, 20),
}
COLUMNS = ["variant", "offset_noise", "norm_groups", "epochs", "gain@t999", "gain@t700", "gain@t500",
           "ddpm_std_at_end", "outside_at_end", "train_seconds"]


def preset_for(groups: int):  # noqa: ANN201
    p = get_preset("tiny-photos32")
    return dataclasses.replace(p, unet={**p.unet, "norm_num_groups": groups})


@torch.no_grad()
def ddpm_spread(den) -> dict:  # noqa: ANN001
    """Pixel std and share outside [-1, 1] of 8 unclipped 1000-step DDPM samples (bench_dc_gain's noises)."""
    g = torch.Generator().manual_seed(0)
    x = ddpm_sample(den, torch.randn((8, *den.image_shape), generator=g), generator=g)
    return {"ddpm_std_at_end": round(float(x.std()), 3), "outside_at_end": round(float((x.abs() > 1).float().mean()), 3)}


def load_rows() -> list[dict]:
    return json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []


def render(rows: list[dict]) -> None:
    write_results("offset_noise", rows, COLUMNS, notes=(
        "tiny-photos32 trained from scratch (terd train's loop, seed 0, one thread) with offset noise; gain@tT as in "
        "dc_gain.md (d mean(eps_theta) / d mean(x_t); the data asks 0.99 / 0.40 / 0.05 without offset noise; the "
        "recorded zoo base without it: 0.01 / 0.01 / 0.007, DDPM spread 5.48). ddpm_std_at_end / outside_at_end: "
        "8 unclipped 1000-step DDPM samples (data std 0.60)."))


def run_train(name: str) -> None:
    offset, groups, epochs = VARIANTS[name]
    out = RUNS / name
    result = train(preset_for(groups), load_dataset("photos32"), out, epochs=epochs, seed=0, offset_noise=offset,
                   grid_size=0, progress=False)
    den = load_denoiser(out)
    row = {"variant": name, "offset_noise": offset, "norm_groups": groups, "epochs": epochs,
           **gains(den, den.image_shape), **ddpm_spread(den), "train_seconds": round(result.seconds, 1),
           "machine": machine()}
    print(row, flush=True)
    rows = [r for r in load_rows() if r["variant"] != name] + [row]
    render(rows)


def run_probe(name: str) -> None:
    _, groups, _ = VARIANTS[name]
    state = torch.load(RUNS / name / STATE_FILE, weights_only=True)
    net = UNet2DModel(**preset_for(groups).unet_config())
    net.load_state_dict(state["ema"])
    print({"variant": name, "epoch": state["epoch"], **gains(eps_of(net.eval()), (3, 32, 32))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["train", "probe", "table"])
    ap.add_argument("variant", nargs="?", choices=sorted(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.action != "table" and args.variant is None:
        ap.error(f"{args.action} needs a variant")
    {"train": lambda: run_train(args.variant), "probe": lambda: run_probe(args.variant),
     "table": lambda: render(load_rows())}[args.action]()


if __name__ == "__main__":
    main()
