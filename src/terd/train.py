"""One training loop: clean DDPM training, or fine-tuning with an attack plugged in as an objective.

An objective decides, for a batch of clean images, what the network sees (x_t) and what it must predict;
the clean objective is the DDPM one, an attack poisons part of the batch. Everything else (EMA, warm-up
+ cosine learning rate, per-epoch checkpoints that resume exactly, the sample grid, the saved diffusers
pipeline) is shared.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from terd.data import ImageDataset
from terd.errors import TerdError
from terd.imaging import save_grid
from terd.models.denoiser import Denoiser
from terd.models.loading import save_pipeline
from terd.models.safe_io import safe_torch_load
from terd.models.schedule import NoiseSchedule
from terd.presets import Preset
from terd.sampling import initial_noise, sample_images

STATE_FILE = "train_state.pt"
RECORD_FILE = "train.json"


def training_record(model_dir: str | Path) -> dict:
    """A model's train.json (written by this loop), or {} when absent or unreadable (a hub id, a foreign model)."""
    info = Path(model_dir) / RECORD_FILE
    try:
        data = json.loads(info.read_text()) if info.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class Objective(Protocol):
    def noisy_pair(
        self, x0: torch.Tensor, labels: torch.Tensor | None, t: torch.Tensor, eps: torch.Tensor,
        schedule: NoiseSchedule, generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t fed to the network, the noise it must predict) for one batch."""


class CleanObjective:
    """DDPM: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, predict eps."""

    def noisy_pair(self, x0, labels, t, eps, schedule, generator):  # noqa: ANN001, ANN201
        abar = schedule.abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps, eps


class EMA:
    """Exponential moving average of the weights, with the usual warm-up min(decay, (1+n)/(10+n))."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.steps = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - d)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)


@dataclass
class TrainResult:
    out_dir: Path
    epochs: int
    seconds: float
    final_loss: float
    resumed_from_epoch: int


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Refuse to clobber a finished model or foreign files; True when a checkpoint can be resumed."""
    if (out_dir / STATE_FILE).is_file():
        return True
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise TerdError(f"{out_dir}: directory is not empty (use another --out, or --overwrite to replace it)")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return False


def check_learning_rate(lr: float | None) -> None:
    """None means the preset's; anything else must be a positive, finite number (0 would silently not train)."""
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise TerdError(f"--lr must be a positive number, got {lr}")


def train(
    preset: Preset,
    dataset: ImageDataset,
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    seed: int = 0,
    objective: Objective | None = None,
    base: Denoiser | None = None,
    lr: float | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    grid_size: int = 64,
    offset_noise: float | None = None,
) -> TrainResult:
    """Train (or, with ``base``, fine-tune) a DDPM or VE score model and save it as a diffusers pipeline.

    Both minimise || eps_theta(x_t, t) - target ||^2 through the :class:`Denoiser`; for a VE model that is
    || -sigma_t s_theta(x, sigma_t) - eps ||^2, denoising score matching with NCSN's sigma^2 weighting.
    ``offset_noise`` adds a per-image, per-channel constant ~ N(0, offset_noise^2) to the noise, which teaches the
    network its input's mean. Default: the preset's from scratch; for a fine-tune, the base's own (its train.json,
    else 0), because a fine-tune on plain noise unlearns it: 4 BadDiffusion epochs on the tiny-photos32-dc base
    took its DC gain at t=999 from 0.97 to 0.22 (benchmarks/results/dc_gain_models.md) and its clean samples
    back to flat colours.
    """
    out_dir = Path(out_dir)
    objective = objective or CleanObjective()
    check_learning_rate(lr)
    lr = lr if lr is not None else preset.lr
    epochs = epochs if epochs is not None else preset.epochs
    if epochs < 1:
        raise TerdError("--epochs must be at least 1")
    if offset_noise is None:
        offset_noise = preset.offset_noise if base is None else float(training_record(base.source).get("offset_noise") or 0.0)
    if offset_noise < 0:
        raise TerdError("offset noise must be >= 0")
    if base is not None:
        unet = copy.deepcopy(base.network)
        schedule = base.schedule
    else:
        torch.manual_seed(seed)
        unet = UNet2DModel(**preset.unet_config())
        schedule = preset.noise_schedule()
    expected = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if tuple(dataset.shape) != expected:
        raise TerdError(f"data is {tuple(dataset.shape)} but the model expects {expected}")
    resume = _prepare_out_dir(out_dir, overwrite)
    unet.to(device).train().requires_grad_(True)
    model = Denoiser(unet, schedule, expected)  # eps for VP and VE networks alike
    ema = EMA(unet, preset.ema_decay)
    steps_per_epoch = max(1, len(dataset) // preset.batch_size)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    sched = get_cosine_schedule_with_warmup(opt, min(preset.warmup_steps, steps_per_epoch * epochs // 10),
                                            steps_per_epoch * epochs)
    start_epoch = 0
    if resume:
        state = safe_torch_load(out_dir / STATE_FILE)
        unet.load_state_dict(state["unet"])
        ema.model.load_state_dict(state["ema"])
        ema.steps = int(state["ema_steps"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["lr_sched"])
        start_epoch = int(state["epoch"])
    images = dataset.images
    labels = dataset.labels
    t0 = time.perf_counter()
    loss_value = float("nan")
    bar = tqdm(range(start_epoch, epochs), desc=f"train {out_dir.name}", disable=None if progress else True, initial=start_epoch,
               total=epochs, unit="epoch")
    for epoch in bar:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)  # per-epoch stream: resume is exact
        order = torch.randperm(len(dataset), generator=g)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * preset.batch_size:(step + 1) * preset.batch_size]
            x0 = images[idx].to(device)
            lab = labels[idx].to(device) if labels is not None else None
            t = torch.randint(0, schedule.num_timesteps, (len(idx),), generator=g).to(device)
            eps = torch.randn(x0.shape, generator=g).to(device)
            if offset_noise > 0:
                eps = eps + offset_noise * torch.randn((*x0.shape[:2], 1, 1), generator=g).to(device)
            x_t, target = objective.noisy_pair(x0, lab, t, eps, schedule, g)
            loss = F.mse_loss(model(x_t, t), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            sched.step()
            ema.update(unet)
            running += loss.item()
        loss_value = running / steps_per_epoch
        bar.set_postfix(loss=f"{loss_value:.4f}")
        torch.save({"unet": unet.state_dict(), "ema": ema.model.state_dict(), "ema_steps": ema.steps,
                    "optim": opt.state_dict(), "lr_sched": sched.state_dict(), "epoch": epoch + 1},
                   out_dir / (STATE_FILE + ".tmp"))
        (out_dir / (STATE_FILE + ".tmp")).replace(out_dir / STATE_FILE)
    seconds = time.perf_counter() - t0
    final = ema.model.eval()
    save_pipeline(final, schedule, out_dir)
    denoiser = Denoiser(final, schedule, expected)
    if grid_size > 0:  # a preview with the sampler the attacks use (1000-step DDPM, unclipped)
        noise = initial_noise(grid_size, expected, seed=seed, device=device)
        save_grid(sample_images(denoiser, noise, sampler="ddpm", seed=seed), out_dir / "samples.png")
    (out_dir / RECORD_FILE).write_text(json.dumps({
        "preset": preset.name, "dataset": dataset.name, "epochs": epochs, "seed": seed, "seconds": round(seconds, 2),
        "final_loss": loss_value, "fine_tuned_from": base.source if base is not None else None,
        "steps_per_epoch": steps_per_epoch, "batch_size": preset.batch_size, "lr": lr,
        "offset_noise": offset_noise,
    }, indent=2))
    (out_dir / STATE_FILE).unlink()
    return TrainResult(out_dir, epochs, seconds, loss_value, start_epoch)
