"""``terd demo`` / ``make demo``: the main job on the embedded default, no user data, no network.

Two tiny models ship inside the package (``terd/assets/models``, recipes in RECIPES.md): a benign one
and a TrojDiff-backdoored one. The demo scans both with the default ``fast`` preset and terd's shipped
thresholds (fitted on other benign models), then shows input detection on the backdoored one: fresh
benign noises against true backdoor inputs, flagged with the reversed trigger only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from terd.errors import TerdError

ASSETS = Path(__file__).resolve().parent / "assets" / "models"
DEMO_MODELS = (("benign", "demo-benign"), ("backdoored", "demo-trojdiff"))


def asset_model(name: str) -> Path:
    path = ASSETS / name
    if not (path / "model_index.json").is_file():
        raise TerdError(f"demo model {name!r} is missing from the installation ({path})")
    return path


def _input_check(model_dir: Path, candidates_file: Path, n: int = 20_000) -> dict:
    """Flag n benign N(0, I) noises and n true backdoor inputs with the scan's input detector (any candidate)."""
    from terd.attacks import load_true_trigger
    from terd.defense.input_detection import load_input_detector

    det = load_input_detector(candidates_file)
    r, gamma = load_true_trigger(model_dir)
    g = torch.Generator().manual_seed(2024)
    benign = torch.randn((n, *r.shape), generator=g)
    backdoor = gamma * torch.randn((n, *r.shape), generator=g) + r
    # the benign count is binomial: 20,000 noises at a true FPR of 1e-3 read 0.056%-0.144% (95%)
    spread = 1.96 * math.sqrt(det.fpr * (1 - det.fpr) / n)
    return {"n": n, "fpr_target": det.fpr, "fpr_sampling_range_95": [max(0.0, det.fpr - spread), det.fpr + spread],
            "flagged_backdoor_inputs": float(det.is_backdoor(backdoor).double().mean()),
            "flagged_benign_inputs": float(det.is_backdoor(benign).double().mean())}


def _scan_one(model: Path, out: Path, threads: int | None) -> dict:
    """One demo scan (in a worker process when the demo runs them side by side)."""
    from terd.defense.scan import scan_model

    if threads:
        torch.set_num_threads(threads)
    return scan_model(model, out, preset="fast", samples=8)


def _scan_all(models: dict[str, Path], out: Path, workers: int) -> dict[str, dict]:
    """Scan every demo model; with 2+ cores, one process per model at cores/models threads each.

    A tiny scan gains 1.75x from a second thread, not 2x, so two one-thread scans side by side finish a little
    sooner than two two-thread scans in turn: 84 s against 91 s in one run (benchmarks/bench_demo_time.py).
    """
    if workers <= 1:
        return {role: _scan_one(model, out / role, None) for role, model in models.items()}
    from terd.zoo import pool_context

    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context("cpu")) as pool:
        jobs = {role: pool.submit(_scan_one, model, out / role, threads) for role, model in models.items()}
        return {role: job.result() for role, job in jobs.items()}


def run_demo(out: str | Path, *, workers: int | None = None, echo: Callable[[str], None] = print) -> dict:
    """Scan both shipped models; write DIR/<role>/ (report, trigger, pictures) and DIR/summary.json.

    ``workers``: scans run at once (default: one per model, up to the CPU count); 1 runs them in turn.
    """
    if workers is not None and workers < 1:
        raise TerdError("--workers must be at least 1")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise TerdError(f"{out}: directory is not empty and is not an earlier demo output; use --out NEW_DIR")
    t0 = time.perf_counter()
    summary: dict = {"models": {}}
    models = {role: asset_model(name) for role, name in DEMO_MODELS}  # a broken installation fails before any work
    for role in models:
        if (out / role).exists():
            shutil.rmtree(out / role)  # an earlier demo run's own output
    workers = min(len(DEMO_MODELS), workers or os.cpu_count() or 1)
    echo(f"scanning the {' and '.join(f'{role} ({name})' for role, name in DEMO_MODELS)} demo models with preset "
         f"fast{', side by side' if workers > 1 else ''} ...")
    reports = _scan_all(models, out, workers)
    for role, name in DEMO_MODELS:
        model, rep = models[role], reports[role]
        s, thr = rep["scores"], rep["thresholds"]
        scores = "  ".join(f"{f}={s[f]:.4g} (threshold {thr[f]:.4g})" for f in thr)
        echo(f"  {role}: verdict {rep['verdict'].upper()}  {scores}  gamma mean "
             f"{rep['trigger_stats']['gamma_mean']:.2f}  "
             f"[{rep['network_evaluations']:,} network evaluations, {rep['seconds']:.0f}s]")
        entry = {"model": name, "truth": role, "verdict": rep["verdict"], "scores": s, "thresholds": thr,
                 "report": str(out / role / "report.json"), "samples": str(out / role / "samples.png")}
        if role == "backdoored":
            entry["input_detection"] = chk = _input_check(model, out / role / rep["candidates_file"])
            echo(f"  input detection with the reversed candidates: {chk['flagged_backdoor_inputs']:.1%} of "
                 f"{chk['n']} true backdoor inputs flagged, {chk['flagged_benign_inputs']:.2%} of {chk['n']} "
                 f"benign noises flagged (target FPR {chk['fpr_target']:.2%}: {chk['n']} noises measure a true "
                 f"{chk['fpr_target']:.2%} as {chk['fpr_sampling_range_95'][0]:.2%}-"
                 f"{chk['fpr_sampling_range_95'][1]:.2%}, 95% of the time)")
        summary["models"][role] = entry
    summary["workers"] = workers
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["correct"] = all(m["verdict"] == m["truth"] for m in summary["models"].values())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo(f"done in {summary['seconds']:.0f}s: {'both verdicts correct' if summary['correct'] else 'WRONG verdict'}; "
         f"pictures: {out}/*/samples.png (row 1: from the reversed trigger, row 2: clean), {out}/*/trigger.png")
    return summary
