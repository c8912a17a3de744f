"""The training loop: a micro model learns, resumes exactly after an interruption, saves a stock pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file

from terd.data import ImageDataset, digits16
from terd.errors import TerdError
from terd.models import load_denoiser
from terd.presets import Preset
from terd.train import CleanObjective, train

MICRO = Preset("micro", "digits16", 1, 8, {"block_out_channels": (32, 32), "layers_per_block": 1,
                                           "down_block_types": ("DownBlock2D", "DownBlock2D"),
                                           "up_block_types": ("UpBlock2D", "UpBlock2D")},
               epochs=2, batch_size=32, lr=2e-3, warmup_steps=2)


@pytest.fixture(scope="module")
def tiny_digits() -> ImageDataset:
    ds = digits16()
    x = torch.nn.functional.interpolate(ds.images[:128], size=(8, 8), mode="bilinear", antialias=True)
    return ImageDataset(x, ds.labels[:128], "digits8")


def test_train_writes_a_stock_diffusers_pipeline(tiny_digits, tmp_path):
    res = train(MICRO, tiny_digits, tmp_path / "m", seed=0, progress=False, grid_size=4)
    assert res.epochs == 2 and res.final_loss < 1.0
    assert (tmp_path / "m/samples.png").is_file()
    info = json.loads((tmp_path / "m/train.json").read_text())
    assert info["epochs"] == 2 and info["preset"] == "micro"
    assert not (tmp_path / "m/train_state.pt").exists()
    pipe = DDPMPipeline.from_pretrained(tmp_path / "m")
    assert pipe.unet.config.sample_size == 8
    assert load_denoiser(tmp_path / "m").image_shape == (1, 8, 8)


class _InterruptAfter(CleanObjective):
    def __init__(self, calls: int) -> None:
        self.left = calls

    def noisy_pair(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().noisy_pair(*args, **kwargs)


class _RecordNoise(CleanObjective):
    def __init__(self) -> None:
        self.noise: list[torch.Tensor] = []

    def noisy_pair(self, x0, labels, t, eps, schedule, generator):  # noqa: ANN001, ANN201
        self.noise.append(eps)
        return super().noisy_pair(x0, labels, t, eps, schedule, generator)


def test_offset_noise_adds_one_constant_per_image_and_channel(tiny_digits, tmp_path):
    """Offset noise shifts each image's noise by one N(0, s^2) constant per channel; 0 leaves the stream as it was."""
    plain, offset = _RecordNoise(), _RecordNoise()
    train(MICRO, tiny_digits, tmp_path / "plain", seed=1, progress=False, grid_size=0, objective=plain)
    train(MICRO, tiny_digits, tmp_path / "offset", seed=1, progress=False, grid_size=0, objective=offset,
          offset_noise=3.0)
    means = [torch.cat(rec.noise).mean(dim=(2, 3)).std().item() for rec in (plain, offset)]
    assert means[0] < 0.3 and 2.4 < means[1] < 3.6  # 8x8 noise: mean std 1/8; the offset's std 3 dominates
    residual = offset.noise[0] - offset.noise[0].mean(dim=(2, 3), keepdim=True)
    assert residual.std().item() == pytest.approx(1.0, abs=0.1)  # the per-pixel noise is still unit
    assert json.loads((tmp_path / "offset/train.json").read_text())["offset_noise"] == 3.0
    again = _RecordNoise()
    train(MICRO, tiny_digits, tmp_path / "again", seed=1, progress=False, grid_size=0, objective=again,
          offset_noise=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain.noise, again.noise, strict=True))
    with pytest.raises(TerdError, match="offset noise"):
        train(MICRO, tiny_digits, tmp_path / "bad", progress=False, grid_size=0, offset_noise=-1.0)


def test_a_fine_tune_keeps_its_base_models_offset_noise(tiny_digits, tmp_path):
    """A preset's offset noise is its pretraining recipe; a fine-tune continues with the noise its base was trained
    on (from the base's train.json), since fine-tuning on plain noise unlearns the input's mean, and a base
    without offset noise (or without a train.json: a foreign model) is fine-tuned on plain noise."""
    import dataclasses

    offset_preset = dataclasses.replace(MICRO, offset_noise=3.0)
    runs = {}
    for name, preset, base in (("scratch", offset_preset, None), ("tuned", MICRO, "scratch"),
                               ("plain", MICRO, None), ("plain-tuned", offset_preset, "plain")):
        runs[name] = _RecordNoise()
        train(preset, tiny_digits, tmp_path / name, seed=1, progress=False, grid_size=0, objective=runs[name],
              base=load_denoiser(tmp_path / base) if base else None, epochs=1)
    spread = {k: torch.cat(r.noise).mean(dim=(2, 3)).std().item() for k, r in runs.items()}
    recorded = {k: json.loads((tmp_path / k / "train.json").read_text())["offset_noise"] for k in runs}
    assert spread["scratch"] > 2.4 and spread["tuned"] > 2.4  # the base's 3.0, whatever the fine-tune's preset
    assert spread["plain"] < 0.3 and spread["plain-tuned"] < 0.3
    assert recorded == {"scratch": 3.0, "tuned": 3.0, "plain": 0.0, "plain-tuned": 0.0}
    (tmp_path / "scratch" / "train.json").unlink()  # a base terd did not train: plain noise
    foreign = _RecordNoise()
    train(MICRO, tiny_digits, tmp_path / "foreign", seed=1, progress=False, grid_size=0, objective=foreign,
          base=load_denoiser(tmp_path / "scratch"), epochs=1)
    assert torch.cat(foreign.noise).mean(dim=(2, 3)).std().item() < 0.3


def test_tiny_photos32_dc_preset_reads_its_inputs_mean_by_construction():
    """The DC-aware 32 px preset: tiny-photos32's network with 8 norm groups (32 would make every first-level
    GroupNorm an instance norm, which erases each channel's mean) and offset noise in pretraining."""
    from diffusers import UNet2DModel

    from terd.presets import get_preset

    plain, dc = get_preset("tiny-photos32"), get_preset("tiny-photos32-dc")
    assert dc.offset_noise == 0.1 and plain.offset_noise == 0.0
    assert (dc.channels, dc.size, dc.dataset) == (plain.channels, plain.size, plain.dataset)
    unet = UNet2DModel(**dc.unet_config())
    assert {m.num_groups for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    assert sum(p.numel() for p in unet.parameters()) == sum(
        p.numel() for p in UNet2DModel(**plain.unet_config()).parameters())


def test_interrupted_training_resumes_to_the_same_weights(tiny_digits, tmp_path):
    train(MICRO, tiny_digits, tmp_path / "straight", seed=3, progress=False, grid_size=0)
    with pytest.raises(KeyboardInterrupt):  # dies in the middle of epoch 2 (4 steps per epoch)
        train(MICRO, tiny_digits, tmp_path / "resumed", seed=3, progress=False, objective=_InterruptAfter(6),
              grid_size=0)
    assert (tmp_path / "resumed/train_state.pt").is_file()
    res = train(MICRO, tiny_digits, tmp_path / "resumed", seed=3, progress=False, grid_size=0)
    assert res.resumed_from_epoch == 1
    a = load_file(tmp_path / "straight/unet/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_refuses_to_overwrite_and_checks_shapes(tiny_digits, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    with pytest.raises(TerdError, match="not empty"):
        train(MICRO, tiny_digits, tmp_path / "busy", progress=False)
    assert (tmp_path / "busy/notes.txt").read_text() == "mine"
    wrong = ImageDataset(torch.zeros(8, 3, 8, 8), None, "rgb")
    with pytest.raises(TerdError, match="expects"):
        train(MICRO, wrong, tmp_path / "w", progress=False)


def test_attack_fine_tune_takes_its_own_batch_size(tiny_digits, tmp_path):
    """`terd attack --batch-size`: more, smaller steps in the same epochs (recorded in train.json)."""
    from terd.attacks import attack_model, build_attack

    train(MICRO, tiny_digits, tmp_path / "base", seed=0, progress=False, grid_size=0)
    attack = build_attack("baddiffusion", (1, 8, 8))
    attack_model(attack, tmp_path / "base", tmp_path / "bd", dataset=tiny_digits, epochs=1, batch_size=16,
                 progress=False)
    info = json.loads((tmp_path / "bd/train.json").read_text())
    assert (info["batch_size"], info["steps_per_epoch"]) == (16, len(tiny_digits) // 16)
    assert (tmp_path / "bd/samples.png").is_file()  # the default 16-sample preview
    attack_model(attack, tmp_path / "base", tmp_path / "bd-np", dataset=tiny_digits, epochs=1, preview=0,
                 progress=False)
    assert (tmp_path / "bd-np/model_index.json").is_file() and not (tmp_path / "bd-np/samples.png").exists()
    with pytest.raises(TerdError, match="--batch-size"):
        attack_model(attack, tmp_path / "base", tmp_path / "bd0", dataset=tiny_digits, epochs=1, batch_size=0,
                     progress=False)
    with pytest.raises(TerdError, match="--preview"):
        attack_model(attack, tmp_path / "base", tmp_path / "bd0", dataset=tiny_digits, epochs=1, preview=-1,
                     progress=False)
    assert not (tmp_path / "bd0").exists()  # refused before anything is written


def test_attack_quick_recipe_applies_only_when_epochs_and_batch_are_unset(tiny_digits, tmp_path, monkeypatch):
    """A measured (epochs, batch) recipe for an (attack, preset) pair replaces the defaults only when the user
    gave neither; an explicit --epochs keeps the preset's batch size."""
    from terd.attacks import attack_model, build_attack
    from terd.attacks import build as build_mod

    train(MICRO, tiny_digits, tmp_path / "base", seed=0, progress=False, grid_size=0)
    name = build_mod.base_preset(tmp_path / "base", build_mod.load_denoiser(tmp_path / "base")).name
    monkeypatch.setitem(build_mod.QUICK_RECIPES, (name, "baddiffusion"), build_mod.QuickRecipe(1, 16))
    attack = build_attack("baddiffusion", (1, 8, 8))
    attack_model(attack, tmp_path / "base", tmp_path / "quick", dataset=tiny_digits, preview=0, progress=False)
    info = json.loads((tmp_path / "quick/train.json").read_text())
    assert (info["epochs"], info["batch_size"]) == (1, 16)
    attack_model(attack, tmp_path / "base", tmp_path / "own", dataset=tiny_digits, epochs=1, preview=0,
                 progress=False)
    info = json.loads((tmp_path / "own/train.json").read_text())
    assert info["batch_size"] != 16 and info["epochs"] == 1
    # TrojDiff's recipe may also depend on the trigger type: the patch's entry wins over the setting's
    monkeypatch.setitem(build_mod.QUICK_RECIPES, (name, "trojdiff", "d2i"), build_mod.QuickRecipe(1, 16))
    monkeypatch.setitem(build_mod.QUICK_RECIPES, (name, "trojdiff", "d2i", "patch"), build_mod.QuickRecipe(1, 8))
    for trigger, batch in (("blend", 16), ("patch", 8)):
        attack = build_attack("trojdiff", (1, 8, 8), trigger=trigger)
        attack_model(attack, tmp_path / "base", tmp_path / trigger, dataset=tiny_digits, preview=0, progress=False)
        assert json.loads((tmp_path / trigger / "train.json").read_text())["batch_size"] == batch


def test_train_record_holds_the_learning_rate_used(tiny_digits, tmp_path):
    """train.json says which Adam learning rate trained the model: the one given, else the preset's."""
    train(MICRO, tiny_digits, tmp_path / "default", epochs=1, progress=False, grid_size=0)
    train(MICRO, tiny_digits, tmp_path / "given", epochs=1, lr=MICRO.lr / 4, progress=False, grid_size=0)
    assert json.loads((tmp_path / "default/train.json").read_text())["lr"] == MICRO.lr
    assert json.loads((tmp_path / "given/train.json").read_text())["lr"] == MICRO.lr / 4
    with pytest.raises(TerdError, match="--lr must be a positive number"):  # 0 would have trained at the preset's
        train(MICRO, tiny_digits, tmp_path / "zero", epochs=1, lr=0.0, progress=False, grid_size=0)
    assert not (tmp_path / "zero").exists()
