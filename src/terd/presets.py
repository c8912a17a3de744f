"""Named model sizes: tiny presets for CPUs (the default here) and the full CIFAR-10 DDPM for GPUs."""

from __future__ import annotations

from dataclasses import dataclass, field

from terd.errors import TerdError
from terd.models.ddim_repo import DDIMRepoConfig, diffusers_config
from terd.models.schedule import NoiseSchedule


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str  # default training data (a built-in name)
    channels: int
    size: int
    unet: dict = field(default_factory=dict)
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    offset_noise: float = 0.0  # std of the per-image, per-channel constant added to the training noise (from scratch)
    summary: str = ""
    ve: dict | None = None  # a VE model: {"format": "edm" or "score", **NoiseSchedule.edm / .ve settings}

    def unet_config(self) -> dict:
        return {"sample_size": self.size, "in_channels": self.channels, "out_channels": self.channels, **self.unet}

    def noise_schedule(self) -> NoiseSchedule:
        """The schedule a model trained from scratch on this preset uses (T = 1000 steps either way)."""
        if self.ve is None:
            return NoiseSchedule.linear()
        settings = {k: v for k, v in self.ve.items() if k != "format"}
        make = NoiseSchedule.edm if self.ve["format"] == "edm" else NoiseSchedule.ve
        return make(**settings, num_timesteps=1000)


_TINY_UNET = {
    "block_out_channels": (32, 64, 64), "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-digits16", "digits16", 1, 16, _TINY_UNET, epochs=40,
               summary="1.1M-parameter UNet on 16x16 digits; a few minutes on 2 CPU cores"),
        # sigma_max: NCSN's rule, about the largest distance between training images (17 in [-1, 1] pixels)
        Preset("tiny-digits16-ve", "digits16", 1, 16, _TINY_UNET, epochs=40,
               ve={"format": "edm", "sigma_min": 0.02, "sigma_max": 20.0, "sigma_data": 0.5,
                   "sigma_schedule": "exponential"},
               summary="tiny-digits16's UNet as a VE model (geometric sigma 0.02..20) with EDM preconditioning"),
        # the same VE SDE as an NCSN score network (ScoreSdeVe format, pixels in [0, 1]: sigma 0.01..10); the raw
        # score parameterisation trains worse than EDM's (in one 40-epoch run ~18-20% of DDIM sample pixels left
        # [-1.5, 1.5]; an ad hoc check, not recorded)
        Preset("tiny-digits16-ncsn", "digits16", 1, 16, {**_TINY_UNET, "time_embedding_type": "fourier"}, epochs=40,
               ve={"format": "score", "sigma_min": 0.01, "sigma_max": 10.0},
               summary="tiny-digits16's UNet as an NCSN score network (VE sigma 0.01..10, pixels in [0, 1])"),
        Preset("tiny-photos32", "photos32", 3, 32, _TINY_UNET, epochs=30,
               summary="1.1M-parameter UNet on 32x32 photo crops; CPU-sized"),
        # tiny-photos32 made to read its input's mean (DC): 8 norm groups (32 make every first-level GroupNorm an
        # instance norm) and offset noise 0.1 in pretraining. Measured in benchmarks/results/offset_noise.md: DC gain
        # 0.97 at t=999 (tiny-photos32: 0.01), unclipped DDPM pixel spread 0.38 (5.5), which BadDiffusion needs.
        Preset("tiny-photos32-dc", "photos32", 3, 32, {**_TINY_UNET, "norm_num_groups": 8}, epochs=20,
               offset_noise=0.1,
               summary="tiny-photos32 that reads its input's mean (8 norm groups, offset noise 0.1); 32 px attacks"),
        Preset("ddpm-cifar10", "photos32", 3, 32,
               {k: v for k, v in diffusers_config(DDIMRepoConfig()).items()
                if k not in ("sample_size", "in_channels", "out_channels")},
               epochs=100, batch_size=128, lr=2e-4, warmup_steps=500, ema_decay=0.9999,
               summary="google/ddpm-cifar10-32 architecture (35.7M parameters): GPU work; pass --data CIFAR_DIR"),
    )
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise TerdError(f"unknown preset {name!r} (available: {', '.join(PRESETS)})")
    return PRESETS[name]
