"""One scan of one model: reversion + model detection + input-detector summary, written to a directory.

Used by ``terd scan``, the demo and the benchmark, so all three write the same report. The output
directory only ever receives the scan's own files: a directory holding anything else is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from terd.defense.calibration import architecture, default_thresholds, shipped_families
from terd.defense.implicated import implicated_candidates
from terd.defense.input_detection import CandidateSetDetector
from terd.defense.model_detection import Thresholds, detect_model, kl_peak_window, kl_per_dim
from terd.defense.reversion import CHECKPOINT_NAME, Progress, get_config, reverse_trigger
from terd.defense.trigger import Trigger, save_candidates
from terd.errors import TerdError
from terd.models import Denoiser, load_denoiser

REPORT, TRIGGER, TRIGGER_PNG, SAMPLES_PNG = "report.json", "trigger.safetensors", "trigger.png", "samples.png"
CANDIDATES = "candidates.safetensors"  # input detection: the reversion's candidates (features recomputable), then the patch probe's
SCAN_MARKER = "terd-scan/1"


def _scan_files() -> set[str]:
    return {REPORT, TRIGGER, TRIGGER_PNG, SAMPLES_PNG, CANDIDATES, CHECKPOINT_NAME, CHECKPOINT_NAME.replace(".safetensors", ".tmp")}


def check_out_dir(out: Path) -> None:
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


DEFAULT_SOURCE = "terd default for preset "
VE_NOTE = ("terd's shipped thresholds are fitted on VP (DDPM) models and do not apply to this VE model (on the "
           "recorded VE models they flag every benign one): calibrate on benign VE models of your own (`terd "
           "calibrate ... --out T.json`, then --thresholds T.json)")
ARCHITECTURE_NOTE = ("terd ships thresholds for preset {preset} fitted on {families} models only, and this model's "
                     "network or schedule is laid out differently (benign models of another architecture sit over "
                     "them: threshold_scope.md): calibrate on benign models of its own kind (`terd calibrate ... "
                     "--out T.json`, then --thresholds T.json)")


# Model families on which terd is measured to miss backdoors: a "benign" verdict there is weak evidence.
COVERAGE_WARNINGS = {
    "edm": ("terd did not detect VillanDiffusion on EDM-preconditioned models (0 of 2 in the recorded VE bench, "
            "benchmarks/results/bench_digits16_ve): near t = T their eps is an analytic skip that follows any "
            "trigger, so the reversed loss barely sees the network. Treat a benign verdict on this model as weak "
            "evidence."),
}


def coverage_warning(den: Denoiser) -> str | None:
    """What terd's recorded benches say it misses on this model's family, if anything."""
    return COVERAGE_WARNINGS.get(den.schedule.parameterization)


def load_thresholds(path: str | Path | None) -> tuple[Thresholds | None, str | None]:
    """Thresholds from the user's file and where they came from; (None, None) without one, because the shipped
    default depends on the model's architecture: :func:`scan_model` picks it once the model is loaded."""
    if path is None:
        return None, None
    return Thresholds.load(path), str(path)


def thresholds_warning(thr: Thresholds | None, den: Denoiser) -> str | None:
    """The fit's own warning (few models), and whether it was fitted on another architecture than this model's."""
    if thr is None:
        return None
    notes = [thr.provenance["warning"]] if thr.provenance.get("warning") else []
    scope = thr.provenance.get("applies_to")
    if scope is not None and scope != architecture(den):
        notes.append("fitted on models of another architecture than this one (their network or schedule differs); "
                     "benign models of one architecture can sit over another's thresholds (threshold_scope.md)")
    return "; ".join(notes) or None


def shipped_thresholds_for(den: Denoiser, preset: str) -> tuple[Thresholds | None, str | None, str | None]:
    """The shipped thresholds fitted on this model's architecture, their source, and -- when terd ships some for
    the preset but none for this architecture -- the note that says why the verdict is withheld."""
    thr = default_thresholds(preset, model=den)
    if thr is not None:
        family = thr.provenance.get("family")
        return thr, DEFAULT_SOURCE + preset + (f" ({family})" if family else ""), None
    families = shipped_families(preset)
    if not families:
        return None, None, None
    note = VE_NOTE if den.schedule.kind != "vp" else ARCHITECTURE_NOTE.format(preset=preset, families=", ".join(families))
    return None, None, note


def _pictures(den, trigger, out: Path, seed: int, n: int = 8, steps: int = 25) -> None:  # noqa: ANN001
    """trigger.png (r and gamma - 1, clamped to [-1, 1]) and a grid: generated from the trigger / clean.

    A 25-step DDIM is enough for a preview of what the trigger makes the model generate; it clips x_0 because
    unclipped DDIM blows up about a third of a tiny model's samples (measured), triggered or not.
    """
    import torch

    from terd.imaging import save_grid
    from terd.sampling import initial_noise, sample_images

    save_grid(torch.stack([trigger.r.clamp(-1, 1), (trigger.gamma - 1).clamp(-1, 1)]), out / TRIGGER_PNG, nrow=2)
    if n <= 0:
        return
    eps = initial_noise(n, den.image_shape, seed=seed + 12345, device=den.device)
    x_T = torch.cat([trigger.inputs(eps.cpu()).to(den.device), eps])
    imgs = sample_images(den, x_T, sampler="ddim", steps=steps, seed=seed, clip_sample=True)
    save_grid(imgs, out / SAMPLES_PNG, nrow=n)


def _kl_peak(triggers: list[Trigger]) -> dict:
    """Where the local KL peaks (the P_r window) in the candidate with the largest P_r: a pointer to a small trigger."""
    peaks = [{**kl_peak_window(kl_per_dim(t.r, t.gamma)), "candidate": i} for i, t in enumerate(triggers)]
    return max(peaks, key=lambda p: p["value"])


def scan_model(
    model: str | Path | Denoiser,
    out: str | Path,
    *,
    preset: str = "fast",
    thresholds: str | Path | Thresholds | None = None,
    seed: int = 0,
    resume: bool = False,
    gamma: str = "learned",
    samples: int = 8,
    device: str = "cpu",
    progress: Progress | None = None,
) -> dict:
    """Reverse the trigger, decide, write ``out/report.json`` (+ trigger and pictures); return the report."""
    t_start = time.perf_counter()
    out = Path(out)
    cfg = get_config(preset, gamma_mode=gamma)
    check_out_dir(out)
    if isinstance(thresholds, Thresholds):
        thr, thr_source = thresholds, thresholds.provenance.get("source", "given thresholds")
    else:
        thr, thr_source = load_thresholds(thresholds)
    den = model if isinstance(model, Denoiser) else load_denoiser(model, device=device)
    withheld_note = None
    if thr is None:  # shipped: only an entry fitted on this model's layout
        thr, thr_source, withheld_note = shipped_thresholds_for(den, preset)
    withheld = withheld_note is not None
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT_NAME
    res = reverse_trigger(den, cfg, seed=seed, checkpoint=ckpt, resume=resume, progress=progress)
    res.trigger.save(out / TRIGGER)
    verdict = detect_model(res.features, thr)  # any candidate over a threshold flags the model
    probe_index = (res.patch_probe or {}).get("candidate_index")
    implicated = implicated_candidates(res.input_candidates, verdict.thresholds if verdict.backdoored else None,
                                       probe_index, res.features)
    save_candidates(res.input_candidates, out / CANDIDATES, implicated)
    det = CandidateSetDetector(res.input_candidates, implicated=implicated)  # flag an input when any of them flags it
    _pictures(den, res.trigger, out, seed, n=samples)
    g = res.trigger.gamma
    report = {
        "format": SCAN_MARKER, "model": str(den.source or model), "verdict": verdict.verdict, "scores": verdict.scores,
        "thresholds": verdict.thresholds, "thresholds_source": thr_source, "thresholds_withheld": withheld,
        "thresholds_warning": thresholds_warning(thr, den),
        "coverage_warning": coverage_warning(den),
        "margin": verdict.margin, "margin_std": verdict.margin_std, "flagged_by": verdict.flagged_by,
        "margin_note": "score - threshold; positive = over the threshold (backdoor side)",
        "preset": preset, "seed": seed, "network_evaluations": res.network_evaluations + res.probe_evaluations,
        "network_evaluations_detail": {"reversion": res.network_evaluations, "patch_probe": res.probe_evaluations},
        "network_calls": res.network_calls, "seconds": res.seconds, "iterations": res.iterations,
        "stopped_early": res.stopped_early, "trigger_movement": res.history.get("movement", []),
        "resumed_from": res.resumed_from,
        "trigger_file": TRIGGER, "candidates_file": CANDIDATES, "trigger_png": TRIGGER_PNG, "samples_png": SAMPLES_PNG if samples > 0 else None,
        "samples_layout": "row 1: generated from x_T = gamma*eps + r (reversed trigger); row 2: same eps, clean",
        "trigger_stats": {"r_l2": float(res.trigger.r.norm()), "r_abs_mean": float(res.trigger.r.abs().mean()),
                          "gamma_mean": float(g.mean()), "gamma_min": float(g.min()), "gamma_max": float(g.max())},
        "kl_peak": _kl_peak(res.candidate_triggers),
        "candidates": res.candidates, "patch_probe": res.patch_probe, "input_detection": {**det.summary(), "detector_file": CANDIDATES}, "config": res.config,
        "seconds_total": round(time.perf_counter() - t_start, 3),
    }
    if thr is None:
        report["note"] = (withheld_note if withheld else
                          "no calibrated threshold is available for this preset: the verdict is based on scores "
                          "only once thresholds exist (run `terd calibrate` on benign models, pass --thresholds)")
        report["verdict"] = "uncalibrated"
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
