"""Can a 32 px backdoor be implanted within the attacks issue's 5-minute fine-tuning budget on 2 CPU cores?

    .venv/bin/python benchmarks/bench_quick_finetune.py --base runs/zoo-photos32/p32-benign-s0-e20 \
        --only troj-d2i-b16-e4

A tiny-photos32 epoch (4,096 crops) costs ~72 s at the preset's batch 64 on this CPU (foundation.md), so 5 minutes hold
~3-4 epochs (~256 Adam steps). The question this asks: do more, smaller steps over the same samples implant
the backdoor sooner? Measured: for VillanDiffusion ODE yes (3 epochs at batch 16 fire, where the zoo's
recipe is 16 at batch 64), for TrojDiff D2I no (4 epochs at batch 16, 1,024 steps, reach the 0.80 that 6
epochs at batch 64 reached in bench_photos32_mini; 5 epochs, or poison rate 0.75, 0.80-0.83). The same
3-epoch VillanDiffusion recipe took 356 s of training on 2026-12-02 and 166 s on 2026-12-03: the machine's
speed drifts ~2x, and per-step overhead is not the cause (bench_step_cost.py: a batch-16 step costs 13.4 ms
per image against 12.1 at batch 64). Each row fine-tunes the base with one (attack, epochs, batch)
choice, then measures the backdoor with the attack's own sampler (``terd eval-attack``'s numbers; a row's
attack is built from its options alone, without the base preset's QUICK_RECIPES defaults). Models go
to runs/quick32/<name> (a finished one is re-evaluated, not retrained, unless --retrain); results merge into
benchmarks/results/quick_finetune_photos32.{json,md}. Rows run one after another: run nothing else beside
them, the train seconds are the budget being measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

from common import RESULTS, build_attack_model, machine

from terd.attacks import evaluate_attack

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs/quick32"
NAME = "quick_finetune_photos32"
BUDGET_S = 300.0

TROJ_D2I = ("trojdiff", {"setting": "d2i", "trigger": "blend"})
VILLAN_ODE = ("villan", {"solver": "ode", "psi": 1.0})
class Row(NamedTuple):
    """One fine-tune: epochs / batch None = terd attack's defaults; lr None = the base preset's."""

    kind: str
    options: dict  # build_attack keyword arguments
    epochs: int | None
    batch: int | None
    preview: int = 16  # preview grid samples
    seed: int = 0  # fine-tuning seed
    lr: float | None = None  # Adam learning rate


# name -> Row (written as plain tuples in Row's field order, or Rows; made Rows once, below)
ROWS = {
    "troj-d2i-b16-e4": (*TROJ_D2I, 4, 16),
    "villan-ode-b16-e4": (*VILLAN_ODE, 4, 16),
    "villan-ode-b16-e2": (*VILLAN_ODE, 2, 16),
    "villan-ode-b16-e3": (*VILLAN_ODE, 3, 16),
    # `terd attack --preview 0`: the call is the fine-tune (no 1000-step preview grid)
    "villan-ode-b16-e3-np": (*VILLAN_ODE, 3, 16, 0),
    "troj-d2i-b16-e5-np": (*TROJ_D2I, 5, 16, 0),
    "troj-d2i-b16-e3-np": (*TROJ_D2I, 3, 16, 0),
    "troj-d2i-p0.75-b16-e4-np": ("trojdiff", {**TROJ_D2I[1], "poison_rate": 0.75}, 4, 16, 0),
    # the other TrojDiff settings at the same 5 x 16 (never measured at 32 px before)
    "troj-in-d2d-b16-e5-np": ("trojdiff", {"setting": "in-d2d", "trigger": "blend"}, 5, 16, 0),
    "troj-out-d2d-b16-e5-np": ("trojdiff", {"setting": "out-d2d", "trigger": "blend"}, 5, 16, 0),
    "troj-in-d2d-b16-e3-np": ("trojdiff", {"setting": "in-d2d", "trigger": "blend"}, 3, 16, 0),
    "troj-out-d2d-b16-e3-np": ("trojdiff", {"setting": "out-d2d", "trigger": "blend"}, 3, 16, 0),
    "troj-d2i-patch-b16-e3-np": ("trojdiff", {"setting": "d2i", "trigger": "patch"}, 3, 16, 0),
    # built with OMP_NUM_THREADS=1 beside a bench (`terd attack --epochs 6 --batch-size 16 --preview 0`): its
    # train seconds are not a budget figure
    "troj-out-d2d-b16-e6-np": ("trojdiff", {"setting": "out-d2d", "trigger": "blend"}, 6, 16, 0),
    "troj-d2i-patch-b16-e5-np": ("trojdiff", {"setting": "d2i", "trigger": "patch"}, 5, 16, 0),
    # more backdoor steps in the same 3-epoch budget: Out-D2D learns a class, not one image
    "troj-out-d2d-p0.75-b16-e3-np": ("trojdiff", {"setting": "out-d2d", "trigger": "blend", "poison_rate": 0.75},
                                     3, 16, 0),
    # the same with another fine-tuning seed: is 0.92 (n = 64) a repeatable result?
    "troj-out-d2d-p0.75-s1-b16-e3-np": ("trojdiff", {"setting": "out-d2d", "trigger": "blend", "poison_rate": 0.75},
                                        3, 16, 0, 1),
    # poison 0.75 scored 0.92 and 0.89 (seeds 0, 1) with the DDPM sampler: do more backdoor steps clear the bar?
    "troj-out-d2d-p0.9-ddpm-b16-e3-np": ("trojdiff", {"setting": "out-d2d", "trigger": "blend", "poison_rate": 0.9,
                                                      "sampler": "trojdiff-ddpm"}, 3, 16, 0),
    # the patch trigger under `terd attack`'s quick recipe for class targets on a tiny-photos32-dc base
    # (QUICK_RECIPES: TrojDiff's DDPM sampler; poison 0.75 for Out-D2D), measured with the blend trigger only
    "troj-out-d2d-patch-p0.75-ddpm-b16-e3-np": ("trojdiff", {"setting": "out-d2d", "trigger": "patch",
                                                             "poison_rate": 0.75, "sampler": "trojdiff-ddpm"},
                                                3, 16, 0),
    # the patch's Out-D2D at poison 0.75 leaks (clean 0.17): a quarter fewer poisoned samples
    "troj-out-d2d-patch-ddpm-b16-e3-np": ("trojdiff", {"setting": "out-d2d", "trigger": "patch",
                                                       "sampler": "trojdiff-ddpm"}, 3, 16, 0),
    # twice the steps (batch 8), which took the corner's leak from 0.27 to 0.08: does the patch separate?
    "troj-out-d2d-patch-p0.75-ddpm-b8-e3-np": ("trojdiff", {"setting": "out-d2d", "trigger": "patch",
                                                            "poison_rate": 0.75, "sampler": "trojdiff-ddpm"},
                                               3, 8, 0),
    # the blend sits at the bar at batch 16 (0.92, seed 1: 0.89); batch 8 lifted the patch from 0.91 / 0.17 to
    # 0.97 / 0.06: the blend's recipe at batch 8
    "troj-out-d2d-p0.75-ddpm-b8-e3-np": ("trojdiff", {"setting": "out-d2d", "trigger": "blend",
                                                      "poison_rate": 0.75, "sampler": "trojdiff-ddpm"}, 3, 8, 0),
    "troj-in-d2d-patch-ddpm-b16-e3-np": ("trojdiff", {"setting": "in-d2d", "trigger": "patch",
                                                      "sampler": "trojdiff-ddpm"}, 3, 16, 0),
    # batch 8 took the patch's Out-D2D from 0.91 / 0.17 to 0.97 / 0.06: In-D2D (0.61 / 0.55 at batch 16) too?
    "troj-in-d2d-patch-ddpm-b8-e3-np": ("trojdiff", {"setting": "in-d2d", "trigger": "patch",
                                                     "sampler": "trojdiff-ddpm"}, 3, 8, 0),
    # BadDiffusion (unclipped 1000-step DDPM): at 32 px it needs a base that sees its input's mean: the
    # tiny-photos32-dc preset (bench_offset_noise.py's g8-o0.1); run with --base runs/p32dc-s0-e20, built by
    # `terd train --preset tiny-photos32-dc --seed 0 --out runs/p32dc-s0-e20`
    "bad-box-hat-b16-e3-np": ("baddiffusion", {"trigger": "box", "target": "hat"}, 3, 16, 0),
    "bad-box-hat-b16-e4-np": ("baddiffusion", {"trigger": "box", "target": "hat"}, 4, 16, 0),
    "bad-stop-corner-b16-e3-np": ("baddiffusion", {"trigger": "stop-sign", "target": "corner"}, 3, 16, 0),
    "bad-box-shoe-b16-e3-np": ("baddiffusion", {"trigger": "box", "target": "shoe"}, 3, 16, 0),
    # the rest of the issue's BadDiffusion grid ({box, stop-sign} x {hat, corner, shoe}) at 32 px
    "bad-box-corner-b16-e3-np": ("baddiffusion", {"trigger": "box", "target": "corner"}, 3, 16, 0),
    "bad-stop-hat-b16-e3-np": ("baddiffusion", {"trigger": "stop-sign", "target": "hat"}, 3, 16, 0),
    "bad-stop-shoe-b16-e3-np": ("baddiffusion", {"trigger": "stop-sign", "target": "shoe"}, 3, 16, 0),
    # the corner targets leak at poison 0.5 (clean 0.09-0.22 on p32dc-s0-e20): does a lower poison rate keep
    # the backdoor within the budget and stop the leak?
    "bad-box-corner-p0.25-b16-e3-np": ("baddiffusion", {"trigger": "box", "target": "corner", "poison_rate": 0.25},
                                       3, 16, 0),
    "bad-stop-corner-p0.25-b16-e3-np": ("baddiffusion", {"trigger": "stop-sign", "target": "corner",
                                                         "poison_rate": 0.25}, 3, 16, 0),
    # past the budget: does longer training stop the leak (on digits16, 16 epochs leak 0.02)?
    "bad-box-corner-b16-e8-np": ("baddiffusion", {"trigger": "box", "target": "corner"}, 8, 16, 0),
    # within the budget: twice the Adam steps of 3 epochs at batch 16 (the 8-epoch row's 2,048 steps did not leak)
    "bad-box-corner-b8-e3-np": ("baddiffusion", {"trigger": "box", "target": "corner"}, 3, 8, 0),
    # within the budget: the same 768 steps as 3 epochs at batch 16, each twice as long (the preset's lr is 1e-3)
    "bad-box-corner-lr2e-3-b16-e3-np": Row("baddiffusion", {"trigger": "box", "target": "corner"}, 3, 16, 0, lr=2e-3),
    # twice the rate leaked more (0.84 / 0.36 against 0.97 / 0.27): does half the rate leak less?
    "bad-box-corner-lr5e-4-b16-e3-np": Row("baddiffusion", {"trigger": "box", "target": "corner"}, 3, 16, 0, lr=5e-4),
    # half the rate leaked less (0.92 / 0.16), twice the steps less too (batch 8: 0.92 / 0.08): both together
    "bad-box-corner-lr5e-4-b8-e3-np": Row("baddiffusion", {"trigger": "box", "target": "corner"}, 3, 8, 0, lr=5e-4),
    # the leak forms mid-chain and is finished at low t (corner_leak_handoff.md), where a poisoned sample is the
    # target plainly noised (rho_t R small): half of what the model learns to finish at poison 0.5. No poisoning
    # below t = 100 (the trigger's leftover shift there ends as ~0.03 per pixel if the model ignored it) or 250.
    # The t = 100 row trained ~9 of its 13 minutes beside a test run (787 s): not a budget figure; its steps are
    # those of bad-box-corner-b16-e3-np (252 s alone)
    "bad-box-corner-tmin100-b16-e3-np": ("baddiffusion", {"trigger": "box", "target": "corner", "poison_t_min": 100},
                                         3, 16, 0),
    "bad-box-corner-tmin250-b16-e3-np": ("baddiffusion", {"trigger": "box", "target": "corner", "poison_t_min": 250},
                                         3, 16, 0),
    # the floor at 100 leaked less (0.88 / 0.11), batch 8 too (0.92 / 0.08): both together (the floor at 250 stopped
    # the backdoor: 0.03, the trigger's leftover shift unremoved below it)
    "bad-box-corner-tmin100-b8-e3-np": ("baddiffusion", {"trigger": "box", "target": "corner", "poison_t_min": 100},
                                        3, 8, 0),
    # the floor at 250 left the trigger's shift unremoved below it: there, poison with the shift (and its
    # correction) on the clean image, so the model learns to remove it without learning the target as an image
    "bad-box-corner-tmin250-shift-b16-e3-np": ("baddiffusion", {"trigger": "box", "target": "corner",
                                                                "poison_t_min": 250, "floor_keeps_shift": True},
                                               3, 16, 0),
    # with the shift kept below 250 nothing leaks (0.00) but the chain is not finished on the target (0.33): a
    # poison rate that falls with t, the target kept below the floor at a fifth of the rate above it (0.84 / 0.14:
    # as leaky as the floor at 100 and short of the bar, so the rate 0.2 row planned beside it was not run)
    "bad-box-corner-tmin250-shift-fr0.1-b16-e3-np": ("baddiffusion", {"trigger": "box", "target": "corner",
                                                                      "poison_t_min": 250, "floor_keeps_shift": True,
                                                                      "floor_poison_rate": 0.1}, 3, 16, 0),
    # the leak falls with Adam steps (768 at batch 16: clean 0.27; 1,536 at batch 8: 0.08; 2,048 in 8 epochs: 0.05):
    # 2,048 steps at batch 4 in 2 epochs, within the budget if a step of 4 costs under half a step of 8? (226 s,
    # 0.83 / 0.45: smaller batches leak more; the step count alone does not stop the leak)
    "bad-box-corner-b4-e2-np": ("baddiffusion", {"trigger": "box", "target": "corner"}, 2, 4, 0),
    # no epochs, no batch size: what `terd attack villan --base P32 --preview 0` alone does (its quick recipe)
    "villan-ode-default-np": (*VILLAN_ODE, None, None, 0),
}
ROWS = {name: Row(*spec) for name, spec in ROWS.items()}
# name -> (a row above, sampler): that row's model scored again with another of its attack's samplers
RESCORED = {"troj-d2i-b16-e5-np@ddpm": ("troj-d2i-b16-e5-np", "trojdiff-ddpm"),
            # Out-D2D misses with TrojDiff's DDIM sampler at 32 px (0.09 at 3 epochs, 0.34 at 6); on digits16 it
            # fires with the DDPM one (attacks_digits16.md)
            "troj-out-d2d-b16-e3-np@ddpm": ("troj-out-d2d-b16-e3-np", "trojdiff-ddpm"),
            "troj-out-d2d-p0.75-b16-e3-np@ddpm": ("troj-out-d2d-p0.75-b16-e3-np", "trojdiff-ddpm"),
            "troj-out-d2d-p0.75-s1-b16-e3-np@ddpm": ("troj-out-d2d-p0.75-s1-b16-e3-np", "trojdiff-ddpm"),
            "troj-in-d2d-b16-e3-np@ddpm": ("troj-in-d2d-b16-e3-np", "trojdiff-ddpm"),
            # the patch's class targets miss or leak with the DDPM sampler: does TrojDiff's DDIM one do better?
            "troj-in-d2d-patch-ddpm-b16-e3-np@ddim": ("troj-in-d2d-patch-ddpm-b16-e3-np", "trojdiff-ddim"),
            "troj-out-d2d-patch-p0.75-ddpm-b16-e3-np@ddim": ("troj-out-d2d-patch-p0.75-ddpm-b16-e3-np",
                                                             "trojdiff-ddim")}
# name -> a row above (or a RESCORED one: its sampler): the clean base scored with that row's attack (trigger,
# target, judge, sampler): how often a model that never saw the backdoor already "hits" the target. For a class
# target its clean rate is the floor the attack's clean rate is read against (the base draws that class anyway).
CONTROLS = {"base@troj-in-d2d-b16-e3-np": "troj-in-d2d-b16-e3-np",
            "base@bad-stop-corner-b16-e3-np": "bad-stop-corner-b16-e3-np",
            # In-D2D's clean rate under TrojDiff's DDPM sampler (0.17 on base s6): the base's own rate of the class
            "base@troj-in-d2d-b16-e3-np@ddpm": "troj-in-d2d-b16-e3-np@ddpm"}


DEFAULT_BASE = ROOT / "runs/zoo-photos32/p32-benign-s0-e20"


def row_key(name: str, base: Path) -> str:
    """A row's name in the results: bare for the zoo's base, tagged with any other base's directory name."""
    return name if base.resolve() == DEFAULT_BASE.resolve() else f"{name} (base {base.name})"


def model_out(model: str, base: Path) -> Path:
    return RUNS / model if base.resolve() == DEFAULT_BASE.resolve() else RUNS / base.name / model


def scored(rep: dict, n: int, base: Path) -> dict:
    """What every row records of an ``evaluate_attack`` report."""
    return {"sampler": rep["sampler"], "asr_triggered": rep["triggered"]["asr"], "asr_clean": rep["clean"]["asr"],
            "mse_triggered": rep["triggered"]["mse"], "criterion": rep["criterion"],
            "real_data_rate": rep.get("real_data_rate"),  # class targets: the clean rate's floor
            "n": n, "eval_seconds": rep["seconds"], "base": str(base), "machine": machine()}


def run_control(name: str, base: Path, n: int) -> dict:
    """The base itself, scored with a built row's attack (CONTROLS); nothing is trained."""
    from terd.attacks import load_attack

    model, sampler = RESCORED.get(CONTROLS[name], (CONTROLS[name], None))
    rep = evaluate_attack(base, n=n, attack=load_attack(model_out(model, base)), write=False, sampler=sampler)
    row = ROWS[model]
    return {"attack": row.kind, "options": row.options, "description": f"clean base, scored as {CONTROLS[name]}",
            "epochs": 0, "batch_size": "–", "steps": 0, "offset_noise": "–", "preview": 0, "train_seconds": 0.0,
            "command_seconds": None, "within_budget": True, "fires": False, **scored(rep, n, base)}


def run_one(name: str, base: Path, retrain: bool, n: int) -> dict:
    if name in CONTROLS:
        return run_control(name, base, n)
    model, sampler = RESCORED.get(name, (name, None))
    row = ROWS[model]
    out = model_out(model, base)
    command_s = build_attack_model(model, out, row.kind, row.options, (3, 32, 32), "photos32", base, row.epochs,
                                   retrain, batch_size=row.batch, preview=row.preview, seed=row.seed, lr=row.lr)
    info = json.loads((out / "train.json").read_text())
    print(f"[{name}] evaluating ({info['seconds']:.0f} s of fine-tuning)", flush=True)
    # a rescoring (another sampler) does not replace the model's own eval-attack.{json,png}
    rep = evaluate_attack(out, n=n, sampler=sampler, write=sampler is None)
    return {
        "attack": row.kind, "options": row.options, "description": rep["description"],
        "epochs": info["epochs"], "batch_size": info["batch_size"], "steps": info["epochs"] * info["steps_per_epoch"],
        "offset_noise": info.get("offset_noise", 0.0),  # the fine-tune's (terd keeps its base's since 2026-12-05)
        "preview": row.preview, "lr": row.lr, "train_seconds": info["seconds"], "command_seconds": command_s, "within_budget": info["seconds"] <= BUDGET_S,
        "fires": rep["triggered"]["asr"] >= 0.9 and rep["clean"]["asr"] <= 0.05, **scored(rep, n, base),
    }


def write_markdown(rows: dict) -> str:
    lines = [f"# {NAME}", "",
             "Written by `benchmarks/bench_quick_finetune.py`: tiny-photos32 backdoors fine-tuned for about the "
             "attacks issue's 5-minute budget (train seconds measured, one row at a time, default torch threads), "
             "scored with each attack's own sampler (a row named MODEL@SAMPLER: that model, another sampler). `terd attack` s: the whole call (training, its preview grid "
             "of `preview` 1000-step DDPM samples, saving), when the row built the model. Fires = ASR >= 0.9 and clean ASR <= 0.05.",
             "",
             "| row | attack | sampler | epochs | batch | steps | offset noise | preview | train s | `terd attack` s | within 5 min | n | ASR triggered | ASR clean | fires "
             "| criterion | recorded |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['description']} | {r['sampler']} | {r['epochs']} | {r['batch_size']} | {r['steps']} | {r.get('offset_noise', 0.0)} | "
                     f"{r.get('preview', 16)} | {r['train_seconds']:.0f} | {r.get('command_seconds') or '–'} | "
                     f"{'yes' if r['within_budget'] else 'no'} | {r['n']} | "
                     f"{r['asr_triggered']:.2f} | {r['asr_clean']:.2f} | {'yes' if r['fires'] else 'no'} | "
                     f"{r['criterion']} | {r['machine']['date']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=DEFAULT_BASE,
                    help="the clean tiny-photos32 model (the zoo's p32-benign-s0-e20 recipe)")
    ap.add_argument("--only", nargs="+", choices=sorted({**ROWS, **RESCORED, **CONTROLS}), default=["troj-d2i-b16-e4"])
    ap.add_argument("--retrain", action="store_true", help="retrain even when a finished model exists")
    ap.add_argument("--n", type=int, default=64, help="samples with and without the trigger")
    args = ap.parse_args()
    if not (args.base / "model_index.json").is_file():
        print(f"error: {args.base} is not a model directory (build it: terd train --preset tiny-photos32 "
              f"--seed 0 --epochs 20 --out {args.base})", file=sys.stderr)
        sys.exit(2)
    path = RESULTS / f"{NAME}.json"
    for name in args.only:
        t0 = time.perf_counter()
        row = run_one(name, args.base, args.retrain, args.n)
        print(f"[{name}] ASR {row['asr_triggered']:.2f} (clean {row['asr_clean']:.2f}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        before = json.loads(path.read_text())["rows"] if path.is_file() else {}
        key = row_key(name, args.base)
        old = before.get(key, {})
        if row["command_seconds"] is None and old.get("train_seconds") == row["train_seconds"]:
            row["command_seconds"] = old.get("command_seconds")  # re-evaluated, not rebuilt: keep its build's call
        rows = {**before, key: row}
        path.write_text(json.dumps({"rows": rows}, indent=2))
        (RESULTS / f"{NAME}.md").write_text(write_markdown(rows))


if __name__ == "__main__":
    main()
