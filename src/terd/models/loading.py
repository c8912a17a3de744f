"""Turn a model location (diffusers dir, bare UNet dir, DDIM-repo checkpoint, hub id) into a Denoiser.

Weights are always read by :mod:`terd.models.safe_io` (never by an unrestricted unpickler), configs are
validated, and a config that does not match its weights is a one-line error, not a silent partial load.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import (
    DDPMPipeline,
    DDPMScheduler,
    EDMEulerScheduler,
    ScoreSdeVePipeline,
    ScoreSdeVeScheduler,
    UNet2DModel,
)

from terd.errors import TerdError
from terd.models.ddim_repo import load_ddim_repo_checkpoint
from terd.models.denoiser import Denoiser
from terd.models.safe_io import load_tensors, read_json
from terd.models.schedule import NoiseSchedule

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CHECKPOINT_SUFFIXES = (".ckpt", ".pth", ".pt")
SUPPORTED_UNETS = ("UNet2DModel",)


def _load_unet_dir(unet_dir: Path) -> UNet2DModel:
    config = read_json(unet_dir / "config.json")
    cls = config.get("_class_name", "UNet2DModel")
    if cls not in SUPPORTED_UNETS:
        raise TerdError(f"{unet_dir}: unsupported architecture {cls!r} (terd supports UNet2DModel and DDIM-repo "
                        "checkpoints)")
    weights = next((unet_dir / n for n in WEIGHT_NAMES if (unet_dir / n).is_file()), None)
    if weights is None:
        raise TerdError(f"{unet_dir}: no weights ({' or '.join(WEIGHT_NAMES)})")
    try:
        unet = UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise TerdError(f"{unet_dir}/config.json: invalid UNet2DModel config ({exc})") from None
    state = load_tensors(weights)
    expected = unet.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or wrong:
        detail = (f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]}), "
                  f"{len(wrong)} of wrong shape (e.g. {wrong[:1]})")
        raise TerdError(f"{unet_dir}: config does not match the weights: {detail}")
    unet.load_state_dict(state)
    return unet


def schedule_from_file(path: Path) -> NoiseSchedule:
    """The noise schedule a diffusers ``scheduler_config.json`` describes (VP or VE)."""
    return NoiseSchedule.from_config(read_json(path))


def _check_pairing(unet: UNet2DModel, schedule: NoiseSchedule, where: Path) -> None:
    """A ScoreSdeVe schedule needs a score network (diffusers' Fourier-embedded UNet2DModel, whose output is
    divided by sigma); an EDM one a network fed log(sigma) / 4, which a Fourier embedding (log of it) cannot take."""
    fourier = unet.config.time_embedding_type == "fourier"
    if schedule.parameterization == "score" and not fourier:
        raise TerdError(f"{where}: a ScoreSdeVeScheduler model needs a UNet2DModel with time_embedding_type "
                        f"'fourier' (the score network), got {unet.config.time_embedding_type!r}")
    if schedule.parameterization == "edm" and fourier:
        raise TerdError(f"{where}: an EDMEulerScheduler model cannot use time_embedding_type 'fourier' (it is fed "
                        "log(sigma) / 4, which can be negative)")


def _image_shape(unet: UNet2DModel) -> tuple[int, int, int]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, h, w)


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # network errors, missing repos, offline mode: all one line for the user
        raise TerdError(f"{repo_id!r} is not a local path and could not be fetched from the hub "
                        f"({type(exc).__name__})") from None


def load_denoiser(source: str | Path, *, device: str | torch.device = "cpu", image_size: int | None = None) -> Denoiser:
    """Load a model from a local path (always) or a hub id (when a network is there).

    Accepted: a diffusers pipeline dir (``model_index.json``, ``unet/``, ``scheduler/``; DDPM/DDIM schedulers,
    or ``ScoreSdeVeScheduler`` with a Fourier-embedded score UNet, or ``EDMEulerScheduler``, for VE models); a bare
    UNet2DModel dir with ``scheduler_config.json`` next to ``config.json``; a DDIM-repo checkpoint file
    (``.ckpt/.pth/.pt``; schedule linear 1e-4..0.02, T = 1000; ``image_size`` defaults to 32).
    """
    source = str(source)
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_hub_id(source):
            path = _download(source)
        else:
            raise TerdError(f"{source}: no such model file or directory")
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise TerdError(f"{path}: unsupported model file (expected a directory or {'/'.join(CHECKPOINT_SUFFIXES)})")
        unet = load_ddim_repo_checkpoint(path, resolution=image_size or 32)
        schedule, family = NoiseSchedule.linear(), "diffusers-unet2d"
    elif (path / "model_index.json").is_file():
        read_json(path / "model_index.json")
        unet = _load_unet_dir(path / "unet")
        sched_file = path / "scheduler" / "scheduler_config.json"
        if not sched_file.is_file():
            raise TerdError(f"{path}: pipeline has no scheduler/scheduler_config.json")
        schedule, family = schedule_from_file(sched_file), "diffusers-unet2d"
    elif (path / "config.json").is_file():
        unet = _load_unet_dir(path)
        sched_file = next((p for p in (path / "scheduler_config.json", path.parent / "scheduler" /
                                       "scheduler_config.json") if p.is_file()), None)
        if sched_file is None:
            raise TerdError(f"{path}: a bare UNet dir needs a scheduler_config.json beside config.json")
        schedule, family = schedule_from_file(sched_file), "diffusers-unet2d"
    else:
        raise TerdError(f"{path}: not a model directory (no model_index.json or config.json)")
    _check_pairing(unet, schedule, path)
    shape = _image_shape(unet)
    if image_size is not None and shape[1:] != (image_size, image_size) and path.is_dir():
        raise TerdError(f"{path}: model is {shape[1]}x{shape[2]}, not {image_size}x{image_size}")
    return Denoiser(unet.to(device).eval(), schedule, shape, family=family, source=str(source))


def save_pipeline(unet: UNet2DModel, schedule: NoiseSchedule, out_dir: str | Path) -> Path:
    """Write a directory that stock ``DDPMPipeline.from_pretrained(out_dir)`` loads (safetensors), or
    ``ScoreSdeVePipeline`` for a score model; an EDM model's parts load with ``UNet2DModel`` /
    ``EDMEulerScheduler.from_pretrained(out_dir, subfolder=...)``."""
    out_dir = Path(out_dir)
    if schedule.parameterization == "edm":  # diffusers has no stock pipeline for an EDM UNet2DModel
        unet.save_pretrained(out_dir / "unet", safe_serialization=True)
        EDMEulerScheduler.from_config(schedule.scheduler_config()).save_pretrained(out_dir / "scheduler")
        (out_dir / "model_index.json").write_text(json.dumps({
            "_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "EDMEulerScheduler"]}, indent=2))
        return out_dir
    if schedule.parameterization == "score":
        pipe = ScoreSdeVePipeline(unet=unet, scheduler=ScoreSdeVeScheduler.from_config(schedule.scheduler_config()))
    else:
        scheduler = DDPMScheduler.from_config({**schedule.scheduler_config(), "clip_sample": False})
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
