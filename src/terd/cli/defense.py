"""Defense commands: scan (trigger reversion + model detection), calibrate, check-inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from terd.cli import DeviceOpt, command
from terd.cli import resolve_device as _device
from terd.errors import TerdError
from terd.rates import DEFAULT_FPR


def _progress_bar(total: int):  # noqa: ANN202
    from tqdm import tqdm

    bar = tqdm(total=total, desc="reversion", unit="it", leave=False, dynamic_ncols=True, disable=None)  # no bar when not a terminal
    done = {1: 0, 2: 0}

    def update(stage: int, it: int, stage_total: int, loss: float) -> None:
        done[stage] = it
        bar.n = done[1] + done[2]
        bar.set_postfix_str(f"stage {stage} loss {loss:.3f}", refresh=False)
        bar.refresh()

    return bar, update


@command
def scan(
    model: Annotated[str, typer.Argument(help="Model dir, DDIM-repo checkpoint or hub id.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for report.json, the trigger and pictures.")],
    preset: Annotated[str, typer.Option(help="fast (default, ~29x fewer network evaluations) or paper (the reference schedule).")] = "fast",
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
    from terd.defense.model_detection import FEATURES
    from terd.defense.reversion import CHECKPOINT_NAME, get_config
    from terd.defense.scan import (
        CANDIDATES,
        REPORT,
        SAMPLES_PNG,
        TRIGGER,
        check_out_dir,
        load_thresholds,
        scan_model,
    )
    from terd.models import load_denoiser

    cfg = get_config(preset, gamma_mode=gamma)
    check_out_dir(out)  # every user error is reported before the progress bar appears
    thr, thr_source = load_thresholds(thresholds)  # read once, handed to the scan (None: the shipped default)
    if thr is not None:
        thr.provenance = {**thr.provenance, "source": thr_source}
    den = load_denoiser(model, device=_device(device))
    if resume and not (out / CHECKPOINT_NAME).is_file():
        typer.echo(f"no checkpoint in {out}; starting a new scan", err=True)
    bar, update = _progress_bar(cfg.stage1_iters + cfg.stage2_iters)
    try:
        report = scan_model(den, out, preset=preset, thresholds=thr, seed=seed, resume=resume, gamma=gamma,
                            samples=samples, progress=update)
    finally:
        bar.close()
    thr = report["thresholds"]
    s = report["scores"]
    line = " ".join(f"{f}={s[f]:.4g}" for f in FEATURES if f in s)
    if thr is None:
        why = report["note"] if report["thresholds_withheld"] else f"no calibrated threshold for preset {preset}"
        typer.echo(f"{model}: no verdict ({why}); {line}")
    else:
        over = report["flagged_by"]
        limits = " ".join(f"{f}={v:.4g}" for f, v in thr.items())
        typer.echo(f"{model}: {report['verdict'].upper()}; {line} (thresholds {limits}"
                   f"{'; over: ' + ', '.join(over) if over else ''})")
        if "P_r" in over:
            pk = report["kl_peak"]
            typer.echo(f"  local anomaly (P_r) at rows {pk['row']}-{pk['row'] + pk['size'] - 1}, "
                       f"cols {pk['col']}-{pk['col'] + pk['size'] - 1}")
        if "L_p" in over:
            pp = report["patch_probe"]
            typer.echo(f"  localized response (L_p): the model's reaction to noise concentrates on about "
                       f"{pp['leading_support']:.0f} of {pp['elements']} elements, as a patch trigger's does")
        if "W_p" in over:
            pp = report["patch_probe"]
            r0, r1, c0, c1 = pp["window_box"]
            typer.echo(f"  patch response (W_p): on rows {r0}-{r1}, cols {c0}-{c1} the model removes an offset of "
                       f"{pp['explained_offset']:.3g} from inputs near {pp['peak_input']:.3g}, as a patch model does")
        if report.get("thresholds_warning"):
            typer.echo(f"  thresholds warning: {report['thresholds_warning']}")
    if report.get("coverage_warning"):
        typer.echo(f"  warning: {report['coverage_warning']}")
    probe = report.get("patch_probe") or {}
    if probe.get("candidate"):
        typer.echo(f"  patch probe: {probe['window_elements']} elements react like a patch trigger (value "
                   f"{probe['value']:.3g}); candidate {probe['candidate_index']} screens inputs for it")
    typer.echo(f"  {report['network_evaluations']} network evaluations in {report['seconds']:.0f}s; gamma mean "
               f"{report['trigger_stats']['gamma_mean']:.3f}; report: {out / REPORT}; trigger: {out / TRIGGER}; "
               f"samples: {out / SAMPLES_PNG}")
    typer.echo(f"  screen initial noises before generation: terd check-inputs NOISES --trigger {out / CANDIDATES}")
    if fail_on_backdoor and report["verdict"] == "backdoored":
        raise typer.Exit(1)


@command
def calibrate(
    models: Annotated[list[str], typer.Argument(help="Benign model dirs (at least 2; 6 or more recommended: fewer are fitted with a warning).")],
    out: Annotated[Path, typer.Option("--out", help="Thresholds JSON to write.")],
    preset: Annotated[str, typer.Option(help="Reversion preset the thresholds are for (fast or paper).")] = "fast",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: DeviceOpt = None,
) -> None:
    """Fit model-detection thresholds (mean + 3 std of M_r, V_r, P_r, L_p) on benign models."""
    from terd.defense.calibration import calibrate as run_calibrate
    from terd.defense.model_detection import FEATURES, THRESHOLDS_FORMAT
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
        scores = " ".join(f"{k}={f[k]:.4g}" for k in FEATURES if k in f)
        typer.echo(f"  {f['model']}: {scores} ({f['network_evaluations']} evals, {f['seconds']:.0f}s)")
    warn = f"  warning: {thr.provenance['warning']}" if "warning" in thr.provenance else ""
    limits = " ".join(f"{k}={v:.4g}" for k, v in thr.values().items())
    typer.echo(f"thresholds ({preset}, {len(feats)} models): {limits} -> {out}{warn}")


@command
def check_inputs(
    inputs: Annotated[Path, typer.Argument(help="Initial noises N x C x H x W (.safetensors or .npy).")],
    trigger: Annotated[Path, typer.Option("--trigger", help="candidates.safetensors from `terd scan` (flag when any "
                                                            "candidate flags; recommended) or its trigger.safetensors.")],
    fpr: Annotated[float, typer.Option(help="Benign false-positive rate of the threshold.")] = DEFAULT_FPR,
    paper_rule: Annotated[bool, typer.Option("--paper-rule", help="Flag when LLR > 0 instead of the FPR "
                                                                   "threshold.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write per-input scores and flags as JSON.")] = None,
) -> None:
    """Flag initial noises that look like backdoor inputs of a reversed trigger (before any generation)."""
    from terd.defense.input_detection import InputDetector, load_input_detector
    from terd.tensors import load_noise

    det = load_input_detector(trigger, fpr=None if paper_rule else fpr)
    x = load_noise(inputs, tuple(det.r.shape))
    scores = det.score(x)
    flags = scores > det.threshold
    n, k = len(flags), int(flags.sum())
    single = isinstance(det, InputDetector)
    label = "LLR" if single else "margin over the nearest candidate's threshold"
    for i in range(min(n, 20)):
        typer.echo(f"  input {i}: {'BACKDOOR' if flags[i] else 'ok'} ({label} {float(scores[i]):.3f})")
    if n > 20:
        typer.echo(f"  ... {n - 20} more")
    if single:
        rule = ("LLR > 0 (paper rule)" if paper_rule else
                f"LLR > {det.threshold:.4g} (benign FPR {fpr:g}, {det.method})")
    else:
        each = "LLR > 0 (paper rule)" if paper_rule else f"benign FPR {fpr / len(det.detectors):.3g} each, {fpr:g} in all"
        which = " the scan's verdict implicates" if det.implicated else ""
        rule = f"any of {len(det.detectors)} candidates{which} flags ({each})"
    typer.echo(f"{k} of {n} inputs flagged as backdoor inputs; rule: {rule}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"inputs": str(inputs), "trigger": str(trigger), "n": n, "flagged": k,
                                   "detector": det.summary(), "flags": flags.tolist(),
                                   "scores": [float(v) for v in scores]}, indent=2) + "\n")
