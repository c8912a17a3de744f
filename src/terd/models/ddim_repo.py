"""The DDIM-repo network (ermongroup/ddim layout) used by TrojDiff, and exact conversion to/from diffusers.

It is the same architecture as google/ddpm-cifar10-32: a diffusers ``UNet2DModel`` with
``flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, norm_eps=1e-6`` and one attention head.
:class:`DDIMRepoUNet` is written out separately (with the checkpoint's own parameter names) so that the
conversion can be tested against an independent implementation, not against itself.

Checkpoints are ``torch.save``-d lists ``[model, optimizer, epoch, step, ema]`` whose weights carry a
``module.`` prefix (DataParallel); they are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

from terd.errors import TerdError


@dataclass(frozen=True)
class DDIMRepoConfig:
    """The ``model:`` section of a DDIM-repo YAML config (plus the image size it was trained at)."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (1,)  # levels (0 = full resolution) with self-attention
    in_channels: int = 3
    resolution: int = 32
    dropout: float = 0.1

    @property
    def attn_resolutions(self) -> tuple[int, ...]:
        return tuple(self.resolution // 2**i for i in self.attn_levels)


# --------------------------------------------------------------------------------------------------
# The network, with the DDIM repo's parameter names
# --------------------------------------------------------------------------------------------------

def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin | cos] of t * 10000^(-k/(dim/2 - 1)) — the DDPM/DDIM-repo timestep embedding."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb, cout)
        self.norm2, self.dropout, self.conv2 = _norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, -1).transpose(1, 2)
        k = self.k(h).reshape(b, c, -1)
        w = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
        out = torch.bmm(self.v(h).reshape(b, c, -1), w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _Down(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Up(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DDIMRepoUNet(nn.Module):
    """eps_theta(x, t) in the DDIM repository's layout (``down.i.block.j``, ``mid.attn_1``, ``up.i``...)."""

    def __init__(self, cfg: DDIMRepoConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch, temb, levels, n = cfg.ch, cfg.ch * 4, len(cfg.ch_mult), cfg.num_res_blocks
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb), nn.Linear(temb, temb)])
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        chans, skips = ch, [ch]
        self.down = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n):
                level.block.append(_ResBlock(chans, ch * m, temb, cfg.dropout))
                chans = ch * m
                if i in cfg.attn_levels:
                    level.attn.append(_Attn(chans))
                skips.append(chans)
            if i != levels - 1:
                level.downsample = _Down(chans)
                skips.append(chans)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = _ResBlock(chans, chans, temb, cfg.dropout)
        self.mid.attn_1 = _Attn(chans)
        self.mid.block_2 = _ResBlock(chans, chans, temb, cfg.dropout)
        up = [None] * levels
        for i in reversed(range(levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(n + 1):
                level.block.append(_ResBlock(chans + skips.pop(), ch * cfg.ch_mult[i], temb, cfg.dropout))
                chans = ch * cfg.ch_mult[i]
                if i in cfg.attn_levels:
                    level.attn.append(_Attn(chans))
            if i != 0:
                level.upsample = _Up(chans)
            up[i] = level
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(chans)
        self.conv_out = nn.Conv2d(chans, cfg.out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](sinusoidal_embedding(t, self.cfg.ch))))
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                hs.append(level.attn[j](h) if len(level.attn) else h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------

def diffusers_config(cfg: DDIMRepoConfig) -> dict:
    """The UNet2DModel config of the same network (google/ddpm-cifar10-32 for the default config)."""
    levels = len(cfg.ch_mult)
    down = ["AttnDownBlock2D" if i in cfg.attn_levels else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if i in cfg.attn_levels else "UpBlock2D" for i in reversed(range(levels))]
    return {
        "sample_size": cfg.resolution, "in_channels": cfg.in_channels, "out_channels": cfg.out_ch,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "down_block_types": down, "up_block_types": up, "downsample_padding": 0, "flip_sin_to_cos": False,
        "freq_shift": 1, "norm_eps": 1e-6, "norm_num_groups": 32, "attention_head_dim": None,
        "act_fn": "silu", "dropout": cfg.dropout, "center_input_sample": False,
        "time_embedding_type": "positional", "mid_block_scale_factor": 1,
    }


_RES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
        "nin_shortcut": "conv_shortcut"}
_ATT = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _rename(key: str, levels: int) -> str:
    """One DDIM-repo parameter name -> its diffusers name."""
    fixed = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    stem, leaf = key.rsplit(".", 1)
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", stem):
        side, lvl, kind, j, part = m.groups()
        blk = f"down_blocks.{lvl}" if side == "down" else f"up_blocks.{levels - 1 - int(lvl)}"
        sub = f"resnets.{j}.{_RES[part]}" if kind == "block" else f"attentions.{j}.{_ATT[part]}"
        return f"{blk}.{sub}.{leaf}"
    if m := re.fullmatch(r"down\.(\d+)\.downsample\.conv", stem):
        return f"down_blocks.{m.group(1)}.downsamplers.0.conv.{leaf}"
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.conv", stem):
        return f"up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{leaf}"
    if m := re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(\w+)", stem):
        which, part = m.groups()
        if which == "attn_1":
            return f"mid_block.attentions.0.{_ATT[part]}.{leaf}"
        return f"mid_block.resnets.{0 if which == 'block_1' else 1}.{_RES[part]}.{leaf}"
    raise TerdError(f"unexpected parameter {key!r} in a DDIM-repo checkpoint")


def _is_attn_qkvo(key: str) -> bool:
    return bool(re.search(r"(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", key))


def to_diffusers_state_dict(state: dict[str, torch.Tensor], cfg: DDIMRepoConfig) -> dict[str, torch.Tensor]:
    """DDIM-repo weights -> UNet2DModel weights (1x1 attention convs become linear layers)."""
    levels = len(cfg.ch_mult)
    out = {}
    for key, value in state.items():
        out[_rename(key, levels)] = value[:, :, 0, 0] if _is_attn_qkvo(key) else value
    return out


def from_diffusers_state_dict(state: dict[str, torch.Tensor], cfg: DDIMRepoConfig) -> dict[str, torch.Tensor]:
    """UNet2DModel weights -> DDIM-repo weights (the inverse of :func:`to_diffusers_state_dict`)."""
    names = DDIMRepoUNet(cfg).state_dict().keys()
    levels = len(cfg.ch_mult)
    out = {}
    for key in names:
        value = state[_rename(key, levels)]
        out[key] = value[:, :, None, None] if _is_attn_qkvo(key) else value
    return out


def infer_config(state: dict[str, torch.Tensor], resolution: int = 32) -> DDIMRepoConfig:
    """Read ch, ch_mult, num_res_blocks and the attention levels off the weights themselves."""
    try:
        ch = state["conv_in.weight"].shape[0]
        in_channels = state["conv_in.weight"].shape[1]
        out_ch = state["conv_out.weight"].shape[0]
        levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"down\.(\d+)\.", k)))
        blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"down\.0\.block\.(\d+)\.", k)))
        ch_mult = tuple(state[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
        attn = tuple(i for i in range(levels) if f"down.{i}.attn.0.q.weight" in state)
    except (KeyError, ValueError) as exc:
        raise TerdError(f"not a DDIM-repo network (missing {exc})") from None
    return DDIMRepoConfig(ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=blocks, attn_levels=attn,
                          in_channels=in_channels, resolution=resolution)


def unet_from_ddim_repo(state: dict[str, torch.Tensor], cfg: DDIMRepoConfig) -> UNet2DModel:
    unet = UNet2DModel(**diffusers_config(cfg))
    missing, unexpected = unet.load_state_dict(to_diffusers_state_dict(state, cfg), strict=False)
    if missing or unexpected:
        raise TerdError(f"DDIM-repo weights do not match the inferred network (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return unet


def ddim_repo_config_from_unet(unet: UNet2DModel) -> DDIMRepoConfig:
    c = unet.config
    ch = c.block_out_channels[0]
    if c.flip_sin_to_cos or c.freq_shift != 1 or c.downsample_padding != 0 or list(c.up_block_types) != [
        b.replace("Down", "Up") for b in reversed(c.down_block_types)
    ]:
        raise TerdError("this UNet2DModel is not DDIM-repo compatible (needs flip_sin_to_cos=False, freq_shift=1, "
                        "downsample_padding=0, mirrored blocks)")
    return DDIMRepoConfig(
        ch=ch, out_ch=c.out_channels, ch_mult=tuple(b // ch for b in c.block_out_channels),
        num_res_blocks=c.layers_per_block,
        attn_levels=tuple(i for i, b in enumerate(c.down_block_types) if b.startswith("Attn")),
        in_channels=c.in_channels, resolution=c.sample_size, dropout=c.dropout,
    )


def _strip_module(state: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_ddim_repo_checkpoint(path: str | Path, resolution: int = 32, prefer_ema: bool = True) -> UNet2DModel:
    """Read a TrojDiff / DDIM-repo checkpoint safely and return the equivalent diffusers UNet2DModel."""
    from terd.models.safe_io import safe_torch_load

    obj = safe_torch_load(path)
    if isinstance(obj, list | tuple):
        dicts = [o for o in obj if isinstance(o, dict)]
        state = obj[-1] if prefer_ema and len(obj) >= 5 and isinstance(obj[-1], dict) else (dicts[0] if dicts else None)
    elif isinstance(obj, dict):
        state = obj.get("ema", obj.get("model", obj))
    else:
        state = None
    if not isinstance(state, dict) or not state:
        raise TerdError(f"{path}: not a DDIM-repo checkpoint (expected [model, optim, epoch, step, ema])")
    state = _strip_module(state)
    return unet_from_ddim_repo(state, infer_config(state, resolution))


def save_ddim_repo_checkpoint(unet: UNet2DModel, path: str | Path) -> DDIMRepoConfig:
    """Write a diffusers UNet2DModel as a DDIM-repo checkpoint ``[model, optim, epoch, step, ema]``."""
    cfg = ddim_repo_config_from_unet(unet)
    state = {f"module.{k}": v.detach().clone() for k, v in from_diffusers_state_dict(unet.state_dict(), cfg).items()}
    torch.save([state, {}, 0, 0, state], path)
    return cfg


__all__ = ["DDIMRepoConfig", "DDIMRepoUNet", "diffusers_config", "load_ddim_repo_checkpoint",
           "save_ddim_repo_checkpoint", "to_diffusers_state_dict", "from_diffusers_state_dict", "infer_config"]
