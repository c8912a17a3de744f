"""From user choices to an attack object, and from a clean model to a backdoored one.

:func:`build_attack` turns names (trigger, target, setting...) into an :class:`~terd.attacks.base.Attack`
sized for the model; :func:`attack_model` fine-tunes the clean model with it through the one training loop
(:func:`terd.train.train`, the attack being the objective) and records the attack next to the weights.

Defaults are chosen for the tiny CPU presets (1M parameters, 3-10 minutes of fine-tuning on 2 cores):
poison rate 0.5 instead of the papers' 0.1, because a small model fine-tuned for 12-28 epochs sees too
few poisoned samples at 0.1 for the backdoor to fire reliably (the reference needed ~40 epochs at 0.1 on
this model size). Measured on tiny-digits16 (benchmarks/results/attacks_digits16.md): BadDiffusion
box -> hat 16 epochs ASR 0.98; TrojDiff 24 epochs (clipped 10-step DDIM): D2I 0.97 with 0.03 of clean samples
hitting the target and Out-D2D 0.97 / 0.05 (at 12 epochs the clean rates were 0.08-0.09), In-D2D 0.84 (0.95
with TrojDiff's DDPM sampler); VillanDiffusion ODE 1.00 at 16 epochs with clipped DDIM-50 (0.62 unclipped,
where a third of all samples blow up). 24 epochs take ~2.5 minutes at 2 threads on tiny-digits16.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from terd.attacks.baddiffusion import BadDiffusion
from terd.attacks.base import Attack, save_attack
from terd.attacks.poison_floor import PoisonFloor
from terd.attacks.triggers import (
    TARGETS,
    image_as_target,
    image_as_trigger,
    make_target,
    make_trigger,
)
from terd.attacks.trojdiff import TrojDiff
from terd.attacks.villan import VillanDiffusion, default_psi
from terd.data import ImageDataset, load_dataset
from terd.errors import TerdError
from terd.models.denoiser import Denoiser
from terd.models.loading import load_denoiser
from terd.presets import PRESETS, Preset
from terd.train import TrainResult, check_learning_rate, train, training_record
from terd.trigger_names import PATCH_GRAMMAR, is_patch_trigger, is_trojdiff_trigger

ATTACK_KINDS = ("baddiffusion", "trojdiff", "villan")


@dataclass(frozen=True)
class AttackDefaults:
    trigger: str
    target: str
    poison_rate: float
    epochs: int


# Tuned on tiny-digits16 (benchmarks/bench_attacks.py); the reference values are noted in the docs.
DEFAULTS = {
    "baddiffusion": AttackDefaults("box", "hat", 0.5, 16),
    "trojdiff": AttackDefaults("blend", "mickey", 0.5, 24),
    "villan": AttackDefaults("box-white", "hat", 0.5, 16),
}
DEFAULT_TARGET_CLASS = {"digits16": 7, "photos32": 4}


@dataclass(frozen=True)
class QuickRecipe:
    """Defaults measured to fire within the attacks issue's 5-minute budget on one base preset (None: the usual
    default). ``epochs``/``batch_size`` apply together, only when neither is given; ``poison_rate``/``sampler``
    (TrojDiff) each apply when not given."""

    epochs: int | None = None
    batch_size: int | None = None
    poison_rate: float | None = None
    sampler: str | None = None


# (base preset, attack[, TrojDiff setting[, trigger type]]) -> QuickRecipe, where the preset's batch at DEFAULTS'
# epochs takes far longer (16 epochs at batch 64 take ~19 minutes at foundation.md's 72 s per epoch) or DEFAULTS miss.
# benchmarks/results/quick_finetune_photos32.md: VillanDiffusion ODE on tiny-photos32, ASR 1.00, clean 0.00 in
# 166-356 s of training on 2 CPU cores; on tiny-photos32-dc (2026-12-05, one slow spell) BadDiffusion box -> hat
# 1.00 / 0.02 (231 s) and box -> shoe 1.00 / 0.02 (241 s), TrojDiff D2I blend 1.00 / 0.00 (219 s) and patch
# 0.98 / 0.00 (239 s), VillanDiffusion ODE 1.00 / 0.00 (231 s); stop-sign -> corner leaks (0.95 / 0.09; poison
# 0.25 on another base: 0.81 / 0.08). TrojDiff's class targets miss there with DDIM and poison 0.5 (base
# p32dc-benign-s6-e12, blend trigger, n = 64, the class judge): Out-D2D (a digit as the target of a photos model)
# scores 0.08 with the DDIM sampler and 0.77 with the DDPM one; at poison 0.75 with DDPM 0.92, clean 0.00, in 252 s.
# In-D2D: DDIM 0.84 with a clean rate of 0.34, DDPM 1.00 / 0.17 (the judge puts 0.11 of real crops in the class).
# On tiny-digits16 (attacks_digits16.md, DEFAULTS' 24 epochs, n = 64, the class judge) the DDPM sampler fires too
# where DDIM misses: Out-D2D 0.97 / 0.00 against 0.61 / 0.00, In-D2D 0.95 / 0.12 against 0.84 / 0.06 (the judge
# puts 0.098 of real digits in the class). Measured and not adopted on the dc preset: learning rates 5e-4 and 2e-3
# for the corner targets (still leak, 0.14-0.36), poison 0.5 for Out-D2D with the patch (0.23 / 0.09). Out-D2D with
# the white patch separates from the clean samples with twice the steps: batch 8, 0.97 / 0.06 (288 s), against
# batch 16's 0.91 / 0.17 (the clean samples drift to digits).
_THREE_AT_16 = QuickRecipe(epochs=3, batch_size=16)
QUICK_RECIPES = {
    ("tiny-photos32", "villan"): _THREE_AT_16,
    ("tiny-photos32-dc", "baddiffusion"): _THREE_AT_16,
    ("tiny-photos32-dc", "villan"): _THREE_AT_16,
    ("tiny-photos32-dc", "trojdiff"): _THREE_AT_16,
    ("tiny-photos32-dc", "trojdiff", "out-d2d"): replace(_THREE_AT_16, poison_rate=0.75, sampler="trojdiff-ddpm"),
    ("tiny-photos32-dc", "trojdiff", "in-d2d"): replace(_THREE_AT_16, sampler="trojdiff-ddpm"),
    ("tiny-photos32-dc", "trojdiff", "out-d2d", "patch"): QuickRecipe(epochs=3, batch_size=8, poison_rate=0.75,
                                                                      sampler="trojdiff-ddpm"),
    ("tiny-digits16", "trojdiff", "out-d2d"): QuickRecipe(sampler="trojdiff-ddpm"),
    ("tiny-digits16", "trojdiff", "in-d2d"): QuickRecipe(sampler="trojdiff-ddpm"),
}


def quick_recipe(preset: str | None, kind: str, setting: str | None = None,
                 trigger_type: str | None = None) -> QuickRecipe:
    """The measured recipe for ``kind`` (and TrojDiff ``setting`` and trigger type, the most specific key first)
    on a base trained with ``preset``, if any."""
    for key in ((preset, kind, setting, trigger_type), (preset, kind, setting), (preset, kind)):
        if key in QUICK_RECIPES:
            return QUICK_RECIPES[key]
    return QuickRecipe()


def model_dataset_name(model_dir: str | Path, shape: tuple[int, int, int]) -> str:
    """The data a model was trained on: its train.json, else the built-in dataset of that shape."""
    if name := training_record(model_dir).get("dataset"):
        return name
    for p in PRESETS.values():
        if (p.channels, p.size, p.size) == tuple(shape):
            return p.dataset
    raise TerdError(f"{model_dir}: cannot tell which data the model was trained on; pass --data")


def _other_dataset(name: str) -> str:
    return "photos32" if name == "digits16" else "digits16"


def _named_or_image(name: str | None, image: str | Path | None, default: str, shape: tuple[int, int, int],
                    maker, image_loader) -> tuple[torch.Tensor, str]:  # noqa: ANN001
    if name is not None and image is not None:
        raise TerdError("give a name or an image, not both")
    c, h, _ = shape
    if image is not None:
        return image_loader(image, c, h), f"image:{Path(image).name}"
    name = name or default
    return maker(name, c, h), name


def build_attack(
    kind: str, shape: tuple[int, int, int], *, data_name: str = "digits16",
    trigger: str | None = None, trigger_image: str | Path | None = None,
    target: str | None = None, target_image: str | Path | None = None,
    setting: str | None = None, target_class: int | None = None, target_data: str | None = None,
    poison_rate: float | None = None, eta: float = 1.0, gamma_a: float | None = None,
    psi: float | None = None, solver: str = "ode", r_mode: str = "trigger", sampler: str | None = None,
    model_kind: str = "vp", preset: str | None = None, poison_t_min: int = 0, floor_keeps_shift: bool = False,
    floor_poison_rate: float = 0.0,
) -> Attack:
    """An attack object for a model of ``shape`` (C x H x W) trained on ``data_name``.

    BadDiffusion / VillanDiffusion: ``trigger`` (box, stop-sign, glasses...) and ``target`` (hat, shoe...).
    TrojDiff: ``trigger`` blend, patch or a patch variant (or an image: a blend delta), ``setting`` in-d2d (``target_class``
    of the training data, default 7 for digits), out-d2d (a class of ``target_data``, by default the other
    built-in dataset) or d2i (``target`` / ``target_image``, default the built-in mickey).
    ``model_kind`` ("vp" or "ve", the base model's ``schedule.kind``) picks VillanDiffusion's default psi;
    ``preset`` (the base model's: ``base_preset(...).name``, as ``attack_model`` reads it) picks TrojDiff's
    poison rate and sampler where QUICK_RECIPES has them (values given here win). ``poison_t_min``,
    ``floor_keeps_shift``, ``floor_poison_rate`` (BadDiffusion / VillanDiffusion): the poison floor's options by
    the names the CLI and zoo files use (:mod:`terd.attacks.poison_floor` says what each does).
    """
    if kind not in ATTACK_KINDS:
        raise TerdError(f"unknown attack {kind!r} (available: {', '.join(ATTACK_KINDS)})")
    d = DEFAULTS[kind]
    rate = d.poison_rate if poison_rate is None else poison_rate
    floor = PoisonFloor(poison_t_min, floor_keeps_shift, floor_poison_rate)
    if kind in ("baddiffusion", "villan"):
        if setting not in (None, "d2i"):
            raise TerdError(f"--setting applies to trojdiff only ({kind} has one fixed target image)")
        if is_trojdiff_trigger(trigger):
            raise TerdError(f"trigger {trigger!r} is a TrojDiff trigger; {kind} uses box, stop-sign, glasses...")
        g, g_name = _named_or_image(trigger, trigger_image, d.trigger, shape, make_trigger, image_as_trigger)
        y, y_name = _named_or_image(target, target_image, d.target, shape, make_target, image_as_target)
        common = dict(poison_rate=rate, eta=eta, r_mode=r_mode, trigger_name=g_name, target_name=y_name,
                      floor=floor)
        if kind == "baddiffusion":
            return BadDiffusion(g, y, **common)
        return VillanDiffusion(g, y, psi=default_psi(model_kind) if psi is None else psi, solver=solver, **common)

    setting = setting or "d2i"
    trigger_type = "patch" if is_patch_trigger(trigger) else "blend"
    quick = quick_recipe(preset, kind, setting, trigger_type)
    if poison_rate is None and quick.poison_rate is not None:
        rate = quick.poison_rate
    if trigger is not None and not is_trojdiff_trigger(trigger):
        raise TerdError(f"TrojDiff triggers are blend, {PATCH_GRAMMAR} or --trigger-image, got {trigger!r}")
    delta, g_name = _named_or_image(trigger, trigger_image, "blend", shape, make_trigger, image_as_trigger)
    label = None
    tdata = None
    if setting == "d2i":
        if target_class is not None or target_data is not None:
            raise TerdError("--target-class/--target-data need --setting in-d2d or out-d2d")
        targets, y_name = _named_or_image(target, target_image, d.target, shape, make_target, image_as_target)
    else:
        if target is not None or target_image is not None:
            raise TerdError(f"--setting {setting} targets a class (--target-class), not --target/--target-image")
        tdata = target_data or (data_name if setting == "in-d2d" else _other_dataset(data_name))
        label = DEFAULT_TARGET_CLASS.get(tdata, 0) if target_class is None else target_class
        ds = load_dataset(tdata, channels=shape[0], size=shape[1])
        targets, y_name = ds.of_class(label), f"{tdata}:{label}"
    return TrojDiff(delta, targets, setting=setting, trigger_type=trigger_type, gamma_a=gamma_a, poison_rate=rate,
                    eta=eta, sampler=sampler or quick.sampler or "trojdiff-ddim", trigger_name=g_name, target_name=y_name,
                    target_data=tdata, target_label=label, floor=floor)


def base_preset(model_dir: str | Path, base: Denoiser) -> Preset:
    """Batch size, EMA and warm-up of the preset the clean model was trained with (or of its shape); its name keys
    QUICK_RECIPES for both halves of a recipe (``build_attack``'s ``preset``, ``attack_model``'s epochs)."""
    name = training_record(model_dir).get("preset")
    if name in PRESETS:
        return PRESETS[name]
    params = base.num_parameters()
    for p in PRESETS.values():
        if ((p.channels, p.size, p.size) == base.image_shape and (params > 10_000_000) == (p.batch_size > 64)
                and (p.ve is None) == (base.schedule.kind == "vp")):
            return p
    c, h, _ = base.image_shape
    return Preset("fine-tune", "", c, h, epochs=20, batch_size=64, lr=2e-4, warmup_steps=500, ema_decay=0.999)


def check_finetune_options(batch_size: int | None, preview: int, lr: float | None = None) -> None:
    """Refuse bad fine-tuning options before anything is loaded or printed."""
    check_learning_rate(lr)
    if batch_size is not None and batch_size < 1:
        raise TerdError("--batch-size must be at least 1")
    if preview < 0:
        raise TerdError("--preview must be 0 (no grid) or more samples")


def attack_model(
    attack: Attack, base_dir: str | Path, out_dir: str | Path, *, dataset: ImageDataset | None = None,
    epochs: int | None = None, lr: float | None = None, batch_size: int | None = None, seed: int = 0,
    device: str = "cpu", overwrite: bool = False, progress: bool = True, ddim_repo_checkpoint: bool = False,
    preview: int = 16,
) -> TrainResult:
    """Fine-tune the clean model at ``base_dir`` with ``attack`` and save the backdoored model in ``out_dir``.

    ``out_dir`` gets a diffusers pipeline (plus train.json and a ``preview``-sample clean grid, samples.png, from
    training: small, as ``terd eval-attack`` samples anyway; 0 skips it, which at 32 px saves about a minute of
    1000-step sampling on 2 CPU cores), the attack
    record (attack.json, attack_tensors.safetensors, true_trigger.safetensors, trigger.png, target.png)
    and, with ``ddim_repo_checkpoint``, ``ckpt.pth`` in the DDIM-repo format TrojDiff releases.
    """
    check_finetune_options(batch_size, preview, lr)
    base = load_denoiser(base_dir, device=device)
    attack.check_schedule(base.schedule)
    if tuple(attack.image_shape) != tuple(base.image_shape):
        raise TerdError(f"attack is built for {attack.image_shape} but the model is {base.image_shape}")
    if ddim_repo_checkpoint:
        from terd.models.ddim_repo import ddim_repo_config_from_unet

        if base.schedule.kind != "vp":
            raise TerdError("the DDIM-repo checkpoint format holds VP (DDPM) models only, not VE score models")
        ddim_repo_config_from_unet(base.network)  # fail before training when the architecture cannot be written
    if dataset is None:
        name = model_dataset_name(base_dir, base.image_shape)
        dataset = load_dataset(name, channels=base.image_shape[0], size=base.image_shape[1])
    preset = base_preset(base_dir, base)
    preset = replace(preset, dataset=dataset.name)
    if epochs is None and batch_size is None:
        quick = quick_recipe(preset.name, attack.kind, getattr(attack, "setting", None),
                             getattr(attack, "trigger_type", None))
        epochs, batch_size = quick.epochs, quick.batch_size
    if batch_size is not None:
        preset = replace(preset, batch_size=batch_size)
    epochs = epochs if epochs is not None else DEFAULTS.get(attack.kind, DEFAULTS["baddiffusion"]).epochs
    result = train(preset, dataset, out_dir, epochs=epochs, seed=seed, objective=attack, base=base, lr=lr,
                   device=device, overwrite=overwrite, progress=progress, grid_size=preview)
    save_attack(attack, out_dir)
    if ddim_repo_checkpoint:
        from terd.models.ddim_repo import save_ddim_repo_checkpoint

        save_ddim_repo_checkpoint(load_denoiser(out_dir).network, Path(out_dir) / "ckpt.pth")
    return result


__all__ = ["ATTACK_KINDS", "DEFAULTS", "QUICK_RECIPES", "TARGETS", "QuickRecipe", "attack_model", "base_preset", "build_attack", "model_dataset_name", "quick_recipe"]
