"""Defense commands: scan (trigger reversion + model detection), calibrate, check-inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from terd.cli import DeviceOpt, command
from terd.cli import resolve_device as _device
from terd.errors import TerdError

REPORT, TRIGGER, TRIGGER_PNG, SAMPLES_PNG = "report.json", "trigger.safetensors", "trigger.png", "samples.png"
SCAN_MARKER = "terd-scan/1"


def _scan_files() -> set[str]:
    from terd.defense.reversion import CHECKPOINT_NAME

    return {REPORT, TRIGGER, TRIGGER_PNG, SAMPLES_PNG, CHECKPOINT_NAME, CHECKPOINT_NAME.replace(".safetensors", ".tmp")}


def _check_out_dir(out: Path) -> None:
    """Only ever (over)write a scan's own files: a directory holding anything else is refused."""
    if out.exists() and not out.is_dir():
        raise TerdError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in _scan_files())
    if foreign:
        raise TerdError(f"--out {out} holds files terd scan did not write ({', '.join(foreign[:3])}"
                        f"{'...' if len(foreign) > 3 else ''}); choose an empty or new directory")
    report = out / REPORT
    if report.is_file():
        try:
            ok = json.loads(report.read_text()).get("format") == SCAN_MARKER
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            ok = False
        if not ok:
            raise TerdError(f"{report} exists and is not a terd scan report; refusing to overwrite it")


def _load_thresholds(path: Path | None, preset: str):  # noqa: ANN202
    from terd.defense.calibration import default_thresholds
    from terd.defense.model_detection import Thresholds

    if path is not None:
        return Thresholds.load(path), str(path)
    thr = default_thresholds(preset)
    return thr, ("terd default for preset " + preset) if thr is not None else None


def _progress_bar(total: int):  # noqa: ANN202
    from tqdm import tqdm

    bar = tqdm(total=total, desc="reversion", unit="it", leave=False, dynamic_ncols=True)
    done = {1: 0, 2: 0}

    def update(stage: int, it: int, stage_total: int, loss: float) -> None:
        done[stage] = it
        bar.n = done[1] + done[2]
        bar.set_postfix_str(f"stage {stage} loss {loss:.3f}", refresh=False)
        bar.refresh()

    return bar, update


def _pictures(den, trigger, out: Path, seed: int, n: int = 8, steps: int = 25) -> None:  # noqa: ANN001
    """trigger.png (r and gamma - 1, clamped to [-1, 1]) and a grid: generated from the trigger / clean.

    A 25-step DDIM (unclipped) is enough for a preview of what the trigger makes the model generate.
    """
    import torch

    from terd.imaging import save_grid
    from terd.sampling import initial_noise, sample_images

    save_grid(torch.stack([trigger.r.clamp(-1, 1), (trigger.gamma - 1).clamp(-1, 1)]), out / TRIGGER_PNG, nrow=2)
    if n <= 0:
        return
    eps = initial_noise(n, den.image_shape, seed=seed + 12345, device=den.device)
    x_T = torch.cat([trigger.inputs(eps.cpu()).to(den.device), eps])
    imgs = sample_images(den, x_T, sampler="ddim", steps=steps, seed=seed)
    save_grid(imgs, out / SAMPLES_PNG, nrow=n)


@command
def scan(
    model: Annotated[str, typer.Argument(help="Model dir, DDIM-repo checkpoint or hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for report.json, the trigger and pictures.")],
    preset: Annotated[str, typer.Option(help="fast (default, ~30x fewer network evaluations) or paper (the reference schedule).")] = "fast",
    thresholds: Annotated[Path | None, typer.Option(help="Thresholds JSON from `terd calibrate` (default: terd's "
                                                         "shipped ones for the preset, if any).")] = None,
    fail_on_backdoor: Annotated[bool, typer.Option("--fail-on-backdoor", help="Exit 1 on a backdoor verdict.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same result).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")] = False,
    gamma: Annotated[str, typer.Option(help="learned (default), fixed (=1) or reference (init 0, lr 1e-3).")] = "learned",
    samples: Annotated[int, typer.Option(help="Images per row of samples.png (trigger / clean); 0: no grid.")] = 8,
    device: DeviceOpt = None,
) -> None:
    """Reverse the trigger of a model and decide whether it is backdoored (exit 0 when the scan completes)."""
    import time

    from terd.defense.input_detection import InputDetector
    from terd.defense.model_detection import detect_model
    from terd.defense.reversion import CHECKPOINT_NAME, get_config, reverse_trigger
    from terd.models import load_denoiser

    t_start = time.perf_counter()
    cfg = get_config(preset, gamma_mode=gamma)
    _check_out_dir(out)
    thr, thr_source = _load_thresholds(thresholds, preset)
    den = load_denoiser(model, device=_device(device))
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_NAME
    if resume and not ckpt.is_file():
        typer.echo(f"no checkpoint in {out}; starting a new scan", err=True)
    bar, update = _progress_bar(cfg.stage1_iters + cfg.stage2_iters)
    try:
        res = reverse_trigger(den, cfg, seed=seed, checkpoint=ckpt, resume=resume, progress=update)
    finally:
        bar.close()
    res.trigger.save(out / TRIGGER)
    verdict = detect_model(res.trigger, thr)
    det = InputDetector(res.trigger)
    _pictures(den, res.trigger, out, seed, n=samples)
    g = res.trigger.gamma
    report = {
        "format": SCAN_MARKER, "model": model, "verdict": verdict.verdict, "scores": verdict.scores,
        "thresholds": verdict.thresholds, "thresholds_source": thr_source,
        "margin": verdict.margin, "margin_std": verdict.margin_std, "flagged_by": verdict.flagged_by,
        "margin_note": "score - threshold; positive = over the threshold (backdoor side)",
        "preset": preset, "seed": seed, "network_evaluations": res.network_evaluations,
        "network_calls": res.network_calls, "seconds": res.seconds, "iterations": res.iterations,
        "stopped_early": res.stopped_early, "resumed_from": res.resumed_from,
        "trigger_file": TRIGGER, "trigger_png": TRIGGER_PNG, "samples_png": SAMPLES_PNG if samples > 0 else None,
        "samples_layout": "row 1: generated from x_T = gamma*eps + r (reversed trigger); row 2: same eps, clean",
        "trigger_stats": {"r_l2": float(res.trigger.r.norm()), "r_abs_mean": float(res.trigger.r.abs().mean()),
                          "gamma_mean": float(g.mean()), "gamma_min": float(g.min()), "gamma_max": float(g.max())},
        "candidates": res.candidates, "input_detection": det.summary(), "config": res.config,
        "seconds_total": round(time.perf_counter() - t_start, 3),
    }
    if thr is None:
        report["note"] = ("no calibrated threshold is available for this preset: the verdict is based on scores "
                          "only once thresholds exist (run `terd calibrate` on benign models, pass --thresholds)")
        report["verdict"] = "uncalibrated"
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    s = verdict.scores
    line = f"M_r={s['M_r']:.4g} V_r={s['V_r']:.4g}"
    if thr is None:
        typer.echo(f"{model}: no verdict (no calibrated threshold for preset {preset}); {line}")
    else:
        typer.echo(f"{model}: {verdict.verdict.upper()}; {line} (thresholds M_r={thr.M_r:.4g} V_r={thr.V_r:.4g}"
                   f"{'; over: ' + ', '.join(verdict.flagged_by) if verdict.flagged_by else ''})")
    typer.echo(f"  {res.network_evaluations} network evaluations in {res.seconds:.0f}s; gamma mean "
               f"{float(g.mean()):.3f}; report: {out / REPORT}; trigger: {out / TRIGGER}; samples: {out / SAMPLES_PNG}")
    if fail_on_backdoor and verdict.backdoored:
        raise typer.Exit(1)


@command
def calibrate(
    models: Annotated[list[str], typer.Argument(help="Benign model dirs (at least 2; 3 or more recommended).")],
    out: Annotated[Path, typer.Option("--out", help="Thresholds JSON to write.")],
    preset: Annotated[str, typer.Option(help="Reversion preset the thresholds are for (fast or paper).")] = "fast",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = None,
) -> None:
    """Fit model-detection thresholds (mean + 3 std of M_r, V_r) on benign models."""
    from terd.defense.calibration import calibrate as run_calibrate
    from terd.defense.model_detection import THRESHOLDS_FORMAT
    from terd.defense.reversion import get_config
    from terd.models import load_denoiser

    get_config(preset)
    if out.exists():
        try:
            ours = json.loads(out.read_text()).get("format") == THRESHOLDS_FORMAT
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, IsADirectoryError):
            ours = False
        if not ours:
            raise TerdError(f"--out {out} exists and is not a terd thresholds file; refusing to overwrite it")
    if len(models) < 2:
        raise TerdError(f"calibration needs at least 2 benign models, got {len(models)}")
    dens = [load_denoiser(m, device=_device(device)) for m in models]  # fail on a bad path before any work
    thr, feats = run_calibrate(dens, preset, seed=seed)
    thr.save(out)
    for f in feats:
        typer.echo(f"  {f['model']}: M_r={f['M_r']:.4g} V_r={f['V_r']:.4g} ({f['network_evaluations']} evals, "
                   f"{f['seconds']:.0f}s)")
    warn = f"  warning: {thr.provenance['warning']}" if "warning" in thr.provenance else ""
    typer.echo(f"thresholds ({preset}, {len(feats)} models): M_r={thr.M_r:.4g} V_r={thr.V_r:.4g} -> {out}{warn}")


@command
def check_inputs(
    inputs: Annotated[Path, typer.Argument(help="Initial noises N x C x H x W (.safetensors or .npy).")],
    trigger: Annotated[Path, typer.Option("--trigger", help="trigger.safetensors from `terd scan`.")],
    fpr: Annotated[float, typer.Option(help="Benign false-positive rate of the threshold.")] = 1e-3,
    paper_rule: Annotated[bool, typer.Option("--paper-rule", help="Flag when LLR > 0 instead of the FPR "
                                                                   "threshold.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write per-input scores and flags as JSON.")] = None,
) -> None:
    """Flag initial noises that look like backdoor inputs of a reversed trigger (before any generation)."""
    from terd.defense.input_detection import InputDetector
    from terd.defense.trigger import Trigger
    from terd.tensors import load_noise

    trig = Trigger.load(trigger)
    x = load_noise(inputs, trig.shape)
    det = InputDetector(trig, fpr=None if paper_rule else fpr)
    scores = det.score(x)
    flags = scores > det.threshold
    n, k = len(flags), int(flags.sum())
    for i in range(min(n, 20)):
        typer.echo(f"  input {i}: {'BACKDOOR' if flags[i] else 'ok'} (LLR {float(scores[i]):.3f})")
    if n > 20:
        typer.echo(f"  ... {n - 20} more")
    rule = "LLR > 0 (paper rule)" if paper_rule else f"LLR > {det.threshold:.4g} (benign FPR {fpr:g}, {det.method})"
    typer.echo(f"{k} of {n} inputs flagged as backdoor inputs; rule: {rule}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"inputs": str(inputs), "trigger": str(trigger), "n": n, "flagged": k,
                                   "detector": det.summary(), "flags": flags.tolist(),
                                   "scores": [float(v) for v in scores]}, indent=2) + "\n")
