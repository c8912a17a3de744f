"""Where the `fast` low-gamma candidate starts: line point or fixed-gamma descent, on every model on disk.

Why: on the tiny-photos32-dc TrojDiff D2I blend model the reversion ended benign-like (bench_photos32dc_heldout).
The gradient of the ending loss at r = 0 did not point at the trigger there, so no line point came near the
trojan valley; `fast` now also tries 40 Adam steps on r at the candidate's start gamma and starts from whichever
point has the lower objective on the shared batch (reversion._line_search_start).

For each model this runs only that start (same seed as a scan, seed 0) and records which rule won, both
objectives, the chosen gamma and ||r||, and, for attacked models, the cosine of the start r and of the descent's r
with the true trigger shift. When the line point wins, the rest of the reversion is bit-identical to the code
before the descent existed (tests/test_defense.py::test_a_losing_descent_leaves_the_run_bit_identical), so every
recorded scan of such a model, and every threshold fitted on such benign models, stays valid.

Needs the model caches in runs/ (built by the zoo runs named in the table; gitignored) and the demo assets.
Run: .venv/bin/python benchmarks/bench_descent_start.py   (about 15 minutes on 2 cores)
     .venv/bin/python benchmarks/bench_descent_start.py --only POPULATION=DIR ...   (add or redo those models'
     rows in the recorded table, e.g. tiny-photos32-dc=runs/gamma/p32dc-troj-d2i-blend-g08)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from terd.attacks import load_true_trigger  # noqa: E402
from terd.attacks.trojdiff import DEFAULT_GAMMA  # noqa: E402
from terd.defense import reversion as rev  # noqa: E402
from terd.errors import TerdError  # noqa: E402
from terd.models.loading import load_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "runs" / "zoo-cache"
QUICK = ROOT / "runs" / "quick32" / "p32dc-s0-e20"
MODELS = [  # (population, model directory)
    *[("tiny-photos32-dc", p) for p in sorted(ZOO.glob("p32dc-*"))],
    *[("tiny-photos32-dc", QUICK / n) for n in ("troj-out-d2d-b16-e3-np", "troj-out-d2d-b16-e6-np")],  # In-D2D:
    # its copy in the zoo cache is p32dc-troj-in-d2d-blend
    *[("tiny-digits16", p) for p in sorted(ZOO.glob("d16-benign-*"))],
    *[("tiny-digits16", ROOT / "src" / "terd" / "assets" / "models" / n)
      for n in ("demo-benign", "digits-benign", "demo-trojdiff")],
    *[("tiny-digits16", ROOT / "runs" / n) for n in ("patch24", "patch24-s1")],
]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)), 3)


def _attack(model: Path) -> str:
    f = model / "attack.json"
    if not f.is_file():
        return "benign"
    a = json.loads(f.read_text())
    label = f"{a['attack']} {a.get('setting', '')} {a.get('trigger', '')}".strip()
    if a.get("gamma_a") is not None and a["gamma_a"] != DEFAULT_GAMMA.get(a.get("trigger")):
        label += f" (gamma_a {a['gamma_a']})"
    return label


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _models(only: list[str]) -> list[tuple[str, Path]]:
    if not only:
        return MODELS
    out = []
    for item in only:
        population, sep, path = item.partition("=")
        if not sep or not (Path(path) / "model_index.json").is_file():
            _fail(f"--only takes POPULATION=MODEL_DIR with a model in it, got {item!r}")
        out.append((population, Path(path).resolve()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=[], help="POPULATION=MODEL_DIR: merge these rows into the table")
    args = ap.parse_args()
    cfg = rev.get_config("fast")
    rows = []
    for population, model in _models(args.only):
        if not (model / "model_index.json").is_file():
            print(f"skip (not on disk): {model}", flush=True)
            continue
        try:
            den = load_denoiser(model).freeze()
        except TerdError as err:
            _fail(f"{model}: {err}")
        counted = rev.CountingDenoiser(den)
        lam = cfg.resolved_l1(den.image_shape)
        t0 = time.perf_counter()
        ((r, _, info),) = rev._line_search_start(counted, cfg, 0, lam).values()
        row = {"model": model.name, "population": population, "attack": _attack(model), "rule": info["rule"],
               "line_objective": round(info["line_objective"], 2),
               "descent_objective": round(info["descent_objective"], 2),
               "start_gamma": info["gamma"], "start_r_rms": round(float(r.pow(2).mean().sqrt()), 4),
               "seconds": round(time.perf_counter() - t0, 1), "evaluations": counted.evaluations}
        if (model / "true_trigger.safetensors").is_file():
            r_true, _ = load_true_trigger(model)
            r_d = rev._fixed_gamma_descent(rev.CountingDenoiser(den), cfg, 0, 1, cfg.gamma_inits()[1], lam)
            row |= {"cos_start_true": _cos(r, r_true), "cos_descent_true": _cos(r_d, r_true)}
        rows.append(row)
        print(row, flush=True)
    if args.only:  # keep every other recorded row; a model measured again replaces its old row
        redone = {r["model"] for r in rows}
        recorded = json.loads((RESULTS / "descent_start.json").read_text())["rows"]
        rows = [r for r in recorded if r["model"] not in redone] + rows
    write_results("descent_start", rows, ["model", "population", "attack", "rule", "line_objective",
                                          "descent_objective", "start_gamma", "start_r_rms", "cos_start_true",
                                          "cos_descent_true", "seconds"],
                  notes="`fast`'s low-gamma candidate (start gamma 0.5, seed 0): which start wins on the shared "
                        "batch (lower objective), and the cosine of the start r (and of the descent's r) with the "
                        "true trigger shift where the model has one. A benign model whose rule is `line` keeps "
                        "every recorded feature bit-identical. Seconds: the start alone (line search + descent).")


if __name__ == "__main__":
    main()
