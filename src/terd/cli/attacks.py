"""Attack commands: ``terd attack {baddiffusion,trojdiff,villan}``, ``terd eval-attack``, ``terd triggers``."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from terd.cli import DeviceOpt, command
from terd.cli import resolve_device as _device
from terd.errors import TerdError
from terd.trigger_names import TARGET_HELP, TRIGGER_HELP


class AttackKind(str, Enum):
    baddiffusion = "baddiffusion"
    trojdiff = "trojdiff"
    villan = "villan"


def _check_image(path: Path | None, what: str) -> None:
    if path is not None and not path.is_file():
        raise TerdError(f"{what} {path}: no such image")


@command
def attack(
    kind: Annotated[AttackKind, typer.Argument(help="baddiffusion, trojdiff or villan.")],
    base: Annotated[str, typer.Option("--base", help="The clean model to backdoor (diffusers dir or checkpoint).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory for the backdoored model.")],
    trigger: Annotated[str | None, typer.Option(help=TRIGGER_HELP)] = None,
    trigger_image: Annotated[Path | None, typer.Option(help="A picture to use as the trigger.")] = None,
    target: Annotated[str | None, typer.Option(help=TARGET_HELP)] = None,
    target_image: Annotated[Path | None, typer.Option(help="A picture to use as the target.")] = None,
    setting: Annotated[str | None, typer.Option(help="TrojDiff: in-d2d, out-d2d or d2i (default d2i).")] = None,
    target_class: Annotated[int | None, typer.Option(help="TrojDiff D2D: the target class label (default 7 for "
                                                     "digits).")] = None,
    target_data: Annotated[str | None, typer.Option(help="TrojDiff D2D: dataset of the target class (out-d2d "
                                                    "default: the other built-in dataset).")] = None,
    poison_rate: Annotated[float | None, typer.Option(help="Fraction of each batch poisoned (default tuned for "
                                                      "tiny models: 0.5; TrojDiff out-d2d on a tiny-photos32-dc "
                                                      "base: 0.75).")] = None,
    eta: Annotated[float, typer.Option(help="Adaptive attack: scale the trigger by eta in (0, 1].")] = 1.0,
    gamma_a: Annotated[float | None, typer.Option(help="TrojDiff noise scale (default 0.6 blend, 0.1 patch).")] = None,
    psi: Annotated[float | None, typer.Option(help="VillanDiffusion psi in [0, 1] (1 = BadDiffusion-style; "
                                                   "default 1 on VP models, 0 on VE score models).")] = None,
    solver: Annotated[str, typer.Option(help="VillanDiffusion: sampler family to backdoor, ode or sde.")] = "ode",
    r_mode: Annotated[str, typer.Option(help="BadDiffusion/Villan R: trigger (default; what sampling uses) or poisoned-image.")] = "trigger",
    poison_t_min: Annotated[int, typer.Option(help="No poisoned sample below this timestep (0: the "
                                                   "reference; terd.attacks.poison_floor says why).")] = 0,
    floor_keeps_shift: Annotated[bool, typer.Option(help="With --poison-t-min (BadDiffusion/Villan): below the "
                                                         "floor, poison with the trigger's shift on the clean image, "
                                                         "not the target.")] = False,
    floor_poison_rate: Annotated[float, typer.Option(help="With --poison-t-min: the poison rate below the floor "
                                                          "(default 0; at most --poison-rate).")] = 0.0,
    sampler: Annotated[str | None, typer.Option(help="TrojDiff sampler: trojdiff-ddim (default; in-d2d and "
                                                "out-d2d on a tiny-digits16 or tiny-photos32-dc base: "
                                                "trojdiff-ddpm) or trojdiff-ddpm.")] = None,
    data: Annotated[str | None, typer.Option(help="Training data (default: the base model's).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Fine-tuning epochs (default per attack, for tiny models; "
                                                    "with no --batch-size either, every attack on tiny-photos32-dc "
                                                    "and villan on tiny-photos32: 3 epochs at batch 16).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the base preset's).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Fine-tuning batch size (default: the base preset's).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    preview: Annotated[int, typer.Option(help="Clean samples in the preview grid samples.png (1000-step DDPM); "
                                              "0: no grid.")] = 16,
    ddim_repo: Annotated[bool, typer.Option(help="Also write ckpt.pth in TrojDiff's DDIM-repo format.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out directory.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Backdoor a clean model by fine-tuning it with an attack; writes the model and its attack record."""
    from terd.attacks.build import (
        attack_model,
        base_preset,
        build_attack,
        check_finetune_options,
        model_dataset_name,
    )
    from terd.data import load_dataset
    from terd.models import load_denoiser

    _check_image(trigger_image, "--trigger-image")
    _check_image(target_image, "--target-image")
    check_finetune_options(batch_size, preview, lr)
    dev = _device(device)
    den = load_denoiser(base, device="cpu")
    data_name = data or model_dataset_name(base, den.image_shape)
    atk = build_attack(kind.value, den.image_shape, data_name=data_name, trigger=trigger, trigger_image=trigger_image,
                       target=target, target_image=target_image, setting=setting, target_class=target_class,
                       target_data=target_data, poison_rate=poison_rate, eta=eta, gamma_a=gamma_a, psi=psi,
                       solver=solver, r_mode=r_mode, sampler=sampler, model_kind=den.schedule.kind,
                       preset=base_preset(base, den).name, poison_t_min=poison_t_min,
                       floor_keeps_shift=floor_keeps_shift, floor_poison_rate=floor_poison_rate)
    atk.check_schedule(den.schedule)
    ds = load_dataset(data_name, channels=den.image_shape[0], size=den.image_shape[1])
    typer.echo(f"attack: {atk.describe()} on {data_name}, fine-tuning {base}")
    res = attack_model(atk, base, out, dataset=ds, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                       device=dev, overwrite=overwrite, ddim_repo_checkpoint=ddim_repo, preview=preview)
    typer.echo(f"backdoored model: {out} ({res.epochs} epochs, {res.seconds:.0f}s, loss {res.final_loss:.4f}); "
               f"trigger {out / 'trigger.png'}, target {out / 'target.png'}, true trigger "
               f"{out / 'true_trigger.safetensors'}; check it with: terd eval-attack {out}")


@command
def eval_attack(
    model: Annotated[str, typer.Argument(help="A model directory written by `terd attack`.")],
    n: Annotated[int, typer.Option("--n", help="Samples with and without the trigger.")] = 64,
    out: Annotated[Path | None, typer.Option("--out", help="Directory for eval-attack.json/.png (default: MODEL).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    sampler: Annotated[str | None, typer.Option(help="TrojDiff only: trojdiff-ddim or trojdiff-ddpm instead of the "
                                                "attack's own.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Does the backdoor fire? ASR, MSE and SSIM to the target with and without the trigger."""
    from terd.attacks.evaluation import evaluate_attack, summary_line

    if not Path(model).is_dir():
        raise TerdError(f"{model}: no such model directory")
    report = evaluate_attack(model, n=n, seed=seed, device=_device(device), out_dir=out, sampler=sampler)
    typer.echo(json.dumps(report, indent=2) if as_json else summary_line(report))


@command
def triggers(
    out: Annotated[Path, typer.Option("--out", help="Directory for one PNG per trigger and target.")],
    size: Annotated[int, typer.Option(help="Image size in pixels.")] = 32,
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3.")] = 3,
) -> None:
    """Draw every built-in trigger and target at a given size (PNG each)."""
    from terd.attacks.triggers import save_gallery

    if size < 2:
        raise TerdError(f"--size must be at least 2, got {size}")
    paths = save_gallery(out, channels=channels, size=size)
    typer.echo(f"wrote {len(paths)} pictures to {out}")
