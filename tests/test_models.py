"""Model loading: DDIM-repo <-> diffusers conversion, safe loading, and one-line errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from terd.errors import TerdError
from terd.models import NoiseSchedule, load_denoiser, save_pipeline
from terd.models.ddim_repo import (
    DDIMRepoConfig,
    DDIMRepoUNet,
    diffusers_config,
    from_diffusers_state_dict,
    infer_config,
    save_ddim_repo_checkpoint,
    to_diffusers_state_dict,
)

SMALL = DDIMRepoConfig(ch=32, out_ch=3, ch_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(1,), in_channels=3,
                       resolution=16)


def _randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (GroupNorm affine too), so no mapping error can hide behind init values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def test_ddim_repo_to_diffusers_same_output():
    repo = _randomised(DDIMRepoUNet(SMALL))
    unet = UNet2DModel(**diffusers_config(SMALL)).eval()
    unet.load_state_dict(to_diffusers_state_dict(repo.state_dict(), SMALL))
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        assert torch.allclose(repo(x, t), unet(x, t).sample, atol=1e-5)


def test_diffusers_to_ddim_repo_same_output_and_round_trip():
    unet = _randomised(UNet2DModel(**diffusers_config(SMALL)), seed=1)
    repo = DDIMRepoUNet(SMALL).eval()
    repo.load_state_dict(from_diffusers_state_dict(unet.state_dict(), SMALL))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 777])
    with torch.no_grad():
        assert torch.allclose(repo(x, t), unet(x, t).sample, atol=1e-5)
    back = to_diffusers_state_dict(repo.state_dict(), SMALL)
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())


def test_cifar_config_is_google_ddpm_cifar10_architecture():
    unet = UNet2DModel(**diffusers_config(DDIMRepoConfig()))
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307
    assert infer_config(DDIMRepoUNet(DDIMRepoConfig()).state_dict()) == DDIMRepoConfig()


def test_ddim_repo_checkpoint_file_loads_with_ema_and_module_prefix(tmp_path):
    repo = _randomised(DDIMRepoUNet(SMALL), seed=2)
    model_sd = {f"module.{k}": torch.zeros_like(v) for k, v in repo.state_dict().items()}
    ema_sd = {f"module.{k}": v for k, v in repo.state_dict().items()}
    torch.save([model_sd, {"state": {}, "param_groups": []}, 5, 1000, ema_sd], tmp_path / "ckpt.pth")
    den = load_denoiser(tmp_path / "ckpt.pth", image_size=16)
    assert den.image_shape == (3, 16, 16)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(den(x, t), repo(x, t), atol=1e-5)  # the EMA weights, not the zeros
    # and back: terd writes the DDIM-repo format that loads to the same network
    save_ddim_repo_checkpoint(den.network, tmp_path / "again.pth")
    den2 = load_denoiser(tmp_path / "again.pth", image_size=16)
    with torch.no_grad():
        assert torch.allclose(den2(x, t), repo(x, t), atol=1e-5)


def test_pipeline_dir_round_trip_and_stock_diffusers_loads_it(tiny_unet, tmp_path):
    sched = NoiseSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    save_pipeline(tiny_unet, sched, tmp_path / "m")
    den = load_denoiser(tmp_path / "m")
    assert torch.equal(den.schedule.alphas_cumprod, sched.alphas_cumprod)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(den(x, 5), tiny_unet(x, torch.tensor([5])).sample)
    pipe = DDPMPipeline.from_pretrained(tmp_path / "m")
    assert isinstance(pipe.scheduler, DDPMScheduler)
    # a bare UNet dir with a scheduler config beside it
    tiny_unet.save_pretrained(tmp_path / "bare")
    DDPMScheduler(beta_schedule="scaled_linear").save_config(tmp_path / "bare")
    assert load_denoiser(tmp_path / "bare").schedule.config["beta_schedule"] == "scaled_linear"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "model.ckpt"
    with bad.open("wb") as fh:
        pickle.dump({"module.conv_in.weight": _Evil(str(marker))}, fh)
    # sanity: plain unpickling would create the marker
    with pytest.raises(TerdError, match="refused to load"):
        load_denoiser(bad)
    assert not marker.exists()
    torch.save([_Evil(str(marker))], tmp_path / "torch_format.pth")
    assert not marker.exists()
    with pytest.raises(TerdError, match="refused to load"):
        load_denoiser(tmp_path / "torch_format.pth")
    assert not marker.exists()


def test_malicious_bin_weights_in_a_pipeline_dir_are_refused(tiny_unet, tmp_path):
    marker = tmp_path / "pwned"
    save_pipeline(tiny_unet, NoiseSchedule.linear(), tmp_path / "m")
    (tmp_path / "m/unet/diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": _Evil(str(marker))}, tmp_path / "m/unet/diffusion_pytorch_model.bin")
    with pytest.raises(TerdError, match="refused"):
        load_denoiser(tmp_path / "m")
    assert not marker.exists()


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("missing", "no such model"),
        ("empty_dir", "not a model directory"),
        ("corrupt_weights", "corrupt safetensors"),
        ("bad_json", "invalid JSON"),
        ("config_mismatch", "config does not match the weights"),
        ("unsupported_arch", "unsupported architecture"),
        ("bad_schedule", "unsupported beta_schedule"),
        ("vpred", "prediction_type 'flow'"),
        ("txt_file", "unsupported model file"),
    ],
)
def test_broken_models_give_one_line_errors(tiny_unet, tmp_path, breakage, message):
    m = tmp_path / "m"
    save_pipeline(tiny_unet, NoiseSchedule.linear(), m)
    target = m
    if breakage == "missing":
        target = tmp_path / "nope"
    elif breakage == "empty_dir":
        target = tmp_path / "empty"
        target.mkdir()
    elif breakage == "corrupt_weights":
        (m / "unet/diffusion_pytorch_model.safetensors").write_bytes(b"garbage" * 10)
    elif breakage == "bad_json":
        (m / "unet/config.json").write_text("{not json")
    elif breakage == "config_mismatch":
        cfg = json.loads((m / "unet/config.json").read_text())
        cfg["block_out_channels"] = [64, 64]
        (m / "unet/config.json").write_text(json.dumps(cfg))
    elif breakage == "unsupported_arch":
        cfg = json.loads((m / "unet/config.json").read_text())
        cfg["_class_name"] = "UNet2DConditionModel"
        (m / "unet/config.json").write_text(json.dumps(cfg))
    elif breakage in ("bad_schedule", "vpred"):
        f = m / "scheduler/scheduler_config.json"
        cfg = json.loads(f.read_text())
        cfg.update({"beta_schedule": "sigmoid"} if breakage == "bad_schedule" else {"prediction_type": "flow"})
        f.write_text(json.dumps(cfg))
    elif breakage == "txt_file":
        target = tmp_path / "model.txt"
        target.write_text("hello")
    with pytest.raises(TerdError, match=message) as info:
        load_denoiser(target)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_v_and_sample_prediction_models_answer_the_unit_noise(prediction, tmp_path):
    """A point-mass network in diffusers' v / x_0 parameterisation: the wrapper must return the exact eps, and
    the prediction type survives a save/load round trip."""
    from torch import nn

    from terd.models import Denoiser

    sched = NoiseSchedule.from_config({"prediction_type": prediction})
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 1, 4, 4, generator=g) * 2 - 1
    abars = sched.alphas_cumprod

    class PointMass(nn.Module):
        def forward(self, x, t):  # noqa: ANN001, ANN201
            a = abars[t].view(-1, 1, 1, 1)
            eps = (x - a.sqrt() * y) / (1 - a).sqrt()
            return a.sqrt() * eps - (1 - a).sqrt() * y if prediction == "v_prediction" else y.expand_as(x)

    den = Denoiser(PointMass(), sched, (1, 4, 4), family="plain")
    t = torch.tensor([0, 10, 500, 999])
    eps = torch.randn(4, 1, 4, 4, generator=g)
    a = sched.abar(t, eps)
    assert torch.allclose(den(a.sqrt() * y + (1 - a).sqrt() * eps, t), eps, atol=5e-4)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    save_pipeline(unet, sched, tmp_path / "m")
    assert load_denoiser(tmp_path / "m").schedule.parameterization == prediction
    assert DDPMPipeline.from_pretrained(tmp_path / "m").scheduler.config.prediction_type == prediction
