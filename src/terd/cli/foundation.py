"""Foundation commands: train, sample, info, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from terd.cli import DeviceOpt, command
from terd.cli import resolve_device as _device
from terd.errors import TerdError


@command
def train(
    out: Annotated[Path, typer.Option("--out", help="Output directory (a diffusers pipeline dir).")],
    preset: Annotated[str, typer.Option(help="tiny-digits16, tiny-digits16-ve (VE, EDM-preconditioned), tiny-digits16-ncsn (VE score network), tiny-photos32, tiny-photos32-dc (reads its input's mean; 32 px attacks) or ddpm-cifar10.")] = "tiny-digits16",
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the preset's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    data: Annotated[str | None, typer.Option(help="digits16, photos32, an image folder, a CIFAR-10 dir or .npz.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out directory.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Train a clean DDPM or VE score model (EMA, resumable checkpoints, sample grid, diffusers pipeline dir)."""
    from terd.data import load_dataset
    from terd.presets import get_preset
    from terd.train import train as run_train

    p = get_preset(preset)
    ds = load_dataset(data or p.dataset, channels=p.channels, size=p.size)
    res = run_train(p, ds, out, epochs=epochs, seed=seed, device=_device(device), overwrite=overwrite)
    resumed = f" (resumed at epoch {res.resumed_from_epoch})" if res.resumed_from_epoch else ""
    typer.echo(f"trained {p.name} on {ds.name} for {res.epochs} epochs in {res.seconds:.0f}s{resumed}; "
               f"loss {res.final_loss:.4f}; model: {out}  samples: {out / 'samples.png'}")


@command
def sample(
    model: Annotated[str, typer.Argument(help="Model dir, DDIM-repo checkpoint or hub id.")],
    out: Annotated[Path, typer.Option("--out", help="PNG grid to write.")],
    n: Annotated[int, typer.Option("--n", help="Number of images.")] = 64,
    init: Annotated[Path | None, typer.Option(help="Initial noises (safetensors tensor 'x' or .npy), N x C x H x W.")] = None,
    sampler: Annotated[str, typer.Option(help="ddpm (1000 steps) or ddim (unclipped, --steps).")] = "ddpm",
    steps: Annotated[int, typer.Option(help="DDIM steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = None,
) -> None:
    """Generate a sample grid, optionally from given initial noises x_T."""
    from terd.imaging import save_grid
    from terd.models import load_denoiser
    from terd.sampling import initial_noise, sample_images
    from terd.tensors import load_noise

    if out.suffix.lower() != ".png":
        raise TerdError(f"--out must be a .png file, got {out}")
    dev = _device(device)
    den = load_denoiser(model, device=dev)
    x_T = load_noise(init, den.image_shape).to(dev) if init else initial_noise(n, den.image_shape, seed=seed, device=dev)
    if sampler not in ("ddim", "ddpm"):
        raise TerdError(f"--sampler must be ddim or ddpm, got {sampler!r}")
    imgs = sample_images(den, x_T, sampler=sampler, steps=steps, seed=seed)
    save_grid(imgs, out)
    typer.echo(f"wrote {len(imgs)} samples to {out}")


@command
def info(model: Annotated[str, typer.Argument(help="Model dir, DDIM-repo checkpoint or hub id.")]) -> None:
    """Print what terd sees in a model (architecture, size, schedule) as JSON."""
    from terd.models import load_denoiser

    den = load_denoiser(model)
    sched = den.schedule
    info = {"source": model, "family": den.family, "image_shape": list(den.image_shape),
            "parameters": den.num_parameters(), "timesteps": den.num_timesteps, "schedule": sched.kind,
            "parameterization": sched.parameterization}
    if sched.kind == "ve":
        info |= {k: sched.config[k] for k in ("sigma_min", "sigma_max", "sigma_schedule") if k in sched.config}
    else:
        info["beta_schedule"] = sched.config.get("beta_schedule")
    typer.echo(json.dumps(info, indent=2))


@command
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo writes its reports and pictures.")] = Path(
        "demo-output"),
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Scans run at once (default: both models side by side on 2+ cores; 1: in turn).")] = None,
) -> None:
    """The main job on the embedded default (shipped tiny models; no user data, no network)."""
    from terd.demo import run_demo

    run_demo(out, workers=workers, echo=typer.echo)
