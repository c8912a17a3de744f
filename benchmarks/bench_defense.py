"""Benchmark the TERD defense on real models: reversion cost, KL features, trigger fidelity, input detection.

Usage (CPU-sized; one model at a time):

    .venv/bin/python benchmarks/bench_defense.py [MODEL_DIR ...] [--preset fast] [--tag NAME]
        [--paper-short N1,N2] [--gamma learned|fixed|reference] [--gamma-init G] [--threads 1]

Without models it scans the shipped benign model and every runs/attacks/*/ that has attack.json.
For each model it records M_r, V_r, gamma statistics, network evaluations and seconds; for attacked
models also the l2 distance of the reversed r to the true trigger and the input-detection TPR/TNR of
the reversed trigger on true backdoor inputs vs benign noise (positive = backdoor input). M_r and V_r are
the scan statistic (each feature's maximum over the reversion candidates); input-detection throughput has
its own script (bench_input_detection.py).

Writes benchmarks/results/defense_<tag>.json and .md. ``--merge A.json B.json`` combines earlier runs
(made one model at a time on a shared machine) into one table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from terd.bench import input_detection_metrics
from terd.defense.input_detection import InputDetector
from terd.defense.model_detection import kl_features
from terd.defense.reversion import get_config, reverse_trigger
from terd.defense.trigger import Trigger
from terd.errors import TerdError
from terd.models import load_denoiser

ROOT = Path(__file__).resolve().parents[1]
BENIGN = ROOT / "src/terd/assets/models/digits-benign"


def default_models() -> list[Path]:
    """The shipped benign model, finished benign runs, and every finished attacked model."""
    benign = sorted(p.parent for p in (ROOT / "runs/benign").glob("*/model_index.json"))
    attacked = sorted(p.parent for p in (ROOT / "runs/attacks").glob("*/attack.json")
                      if (p.parent / "model_index.json").is_file())
    return [BENIGN, *benign, *attacked]


def run_model(path: Path, cfg, seed: int) -> dict:  # noqa: ANN001
    den = load_denoiser(path)
    res = reverse_trigger(den, cfg, seed=seed)
    tr = res.trigger
    row = {"model": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), **res.features,
           "gamma_mean": float(tr.gamma.mean()), "gamma_min": float(tr.gamma.min()),
           "gamma_max": float(tr.gamma.max()), "r_mean": float(tr.r.mean()), "r_l2": float(tr.r.norm()),
           "network_evaluations": res.network_evaluations, "seconds": res.seconds, "iterations": res.iterations,
           "stopped_early": res.stopped_early, "final_loss": {k: v[-1] for k, v in res.history.items()
                                                               if k.startswith("stage") and v},
           "candidates": res.candidates}
    attack = path / "attack.json"
    true = None
    if attack.is_file():
        row["attack"] = json.loads(attack.read_text())
        true = Trigger.load(path / "true_trigger.safetensors")
        row["true_trigger_features"] = kl_features(true)
        row["trigger_l2_to_true"] = float((tr.r - true.r).norm())
        row["gamma_l2_to_true"] = float((tr.gamma - true.gamma).norm())
    row["input_detection"] = input_detection_metrics(InputDetector(tr), None if true is None else true.r,
                                                       None if true is None else true.gamma, 4000, 0)
    return row


def to_markdown(rep: dict) -> str:
    lines = [f"# TERD defense benchmark: {rep['tag']}", "",
             f"preset `{rep['config']['name']}`, gamma `{rep['config']['gamma_mode']}`, seed {rep['seed']}, "
             f"{rep['machine']}, torch threads {rep['threads']}, {rep['created']}", "",
             "| model | M_r | V_r | gamma mean [min, max] | net evals | s | l2(r, true r) | input TPR / TNR |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        det = r["input_detection"]
        io = f"{det['tpr']:.3f} / {det['tnr']:.3f}" if "tpr" in det else f"- / {det['tnr']:.3f}"
        l2 = f"{r['trigger_l2_to_true']:.2f}" if "trigger_l2_to_true" in r else "-"
        lines.append(f"| {r['model']} | {r['M_r']:.4f} | {r['V_r']:.4f} | {r['gamma_mean']:.3f} "
                     f"[{r['gamma_min']:.2f}, {r['gamma_max']:.2f}] | {r['network_evaluations']} | "
                     f"{r['seconds']:.0f} | {l2} | {io} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", type=Path)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--paper-short", default=None, help="N1,N2: the paper preset with fewer iterations")
    ap.add_argument("--gamma", default=None, help="learned, fixed or reference")
    ap.add_argument("--gamma-init", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--merge", nargs="+", type=Path, default=None,
                    help="combine the rows of earlier defense_*.json results (same preset) instead of scanning")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = get_config(args.preset, gamma_mode=args.gamma, gamma_init=args.gamma_init)
    if args.paper_short:
        n1, n2 = (int(v) for v in args.paper_short.split(","))
        cfg = replace(get_config("paper", gamma_mode=args.gamma, gamma_init=args.gamma_init),
                      name=f"paper-short-{n1}-{n2}", stage1_iters=n1, stage2_iters=n2)
    tag = args.tag or cfg.name
    rows = []
    for f in args.merge or []:
        earlier = json.loads(f.read_text())
        if earlier["config"]["name"] != cfg.name:
            raise SystemExit(f"{f}: preset {earlier['config']['name']!r}, not {cfg.name!r}")
        rows += [{**r, "from": f.name} for r in earlier["rows"]]
    for m in [] if args.merge else (args.models or default_models()):
        print(f"scanning {m} with {cfg.name} ...", file=sys.stderr, flush=True)
        try:
            rows.append(run_model(m.resolve(), cfg, args.seed))
        except TerdError as exc:  # a model that vanished or is half-written: skip it, keep the others
            print(f"skipped {m}: {exc}", file=sys.stderr, flush=True)
            continue
        print(json.dumps({k: rows[-1][k] for k in ("M_r", "V_r", "gamma_mean", "network_evaluations", "seconds")}),
              file=sys.stderr, flush=True)
    rep = {"tag": tag, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seed": args.seed,
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": args.threads,
           "config": cfg.__dict__, "paper_evaluation_bound": get_config("paper").network_evaluations_bound(),
           "rows": rows}
    out = ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"defense_{tag}.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / f"defense_{tag}.md").write_text(to_markdown(rep))
    print(to_markdown(rep))


if __name__ == "__main__":
    main()
