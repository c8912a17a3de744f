"""``terd bench``: every defense on every zoo model, with honest thresholds, as files a person can open.

Protocol (what makes the numbers honest):

* every backdoored model's attack success is measured first, with each sampler the attack offers (TrojDiff:
  its DDIM and its DDPM; the attacker picks the sampler, so the best one counts); a model whose backdoor
  does not fire (ASR < ``min_asr``) is listed and excluded from detection metrics;
* thresholds are fitted on benign models of the same dataset and network only (zoo.populations: benign
  KL features differ by architecture), never on the model being judged:
  a benign model is judged by thresholds fitted on the *other* benign models (leave-one-out), a
  backdoored model by thresholds fitted on all benign models; or (``thresholds``: a file, or ``"shipped"``)
  terd's decisions are made by thresholds fitted elsewhere -- a held-out split: a model inside that fit is
  not judged;
* input detection uses the reversed trigger on ``n_inputs`` fresh benign N(0, I) noises and as many
  true backdoor inputs gamma * eps + r of the attack (positive = backdoor input).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import resource
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from terd.defense.model_detection import FEATURES, KL_FEATURES, Thresholds, fit_thresholds
from terd.errors import TerdError
from terd.rates import INPUT_FPR
from terd.zoo import (
    ZooEntry,
    build_zoo,
    cache_dir,
    how_far,
    load_zoo,
    model_dir,
    pool_context,
    populations,
    select_entries,
)

DEFENSES = ("terd-fast", "terd-paper", "elijah")


# --------------------------------------------------------------------------------------------------
# One model (runs in a worker process: peak memory is that process's own)
# --------------------------------------------------------------------------------------------------

def input_detection_metrics(detector, r_true: torch.Tensor | None, g_true: torch.Tensor | None, n: int,  # noqa: ANN001
                            generator_seed: int) -> dict:
    """TNR of an input detector on n benign N(0, I) noises and, given the true trigger, its TPR on n true
    backdoor inputs g_true * eps + r_true, at the detector's threshold."""
    g = torch.Generator().manual_seed(generator_seed)
    shape = tuple(detector.r.shape)
    s_b = detector.score(torch.randn((n, *shape), generator=g))
    out = {"tnr": float((s_b <= detector.threshold).double().mean()), "threshold": detector.threshold, "n": n}
    if r_true is not None:
        s_p = detector.score(g_true * torch.randn((n, *shape), generator=g) + r_true)
        out["tpr"] = float((s_p > detector.threshold).double().mean())
    return out


def input_detection_report(candidates: list, reported: int, r_true: torch.Tensor | None,  # noqa: ANN001
                           g_true: torch.Tensor | None, n: int, generator_seed: int, fpr: float) -> dict:
    """The headline: the any-candidate detector at ``fpr`` (what ``terd scan`` reports and ``check-inputs`` uses
    on a candidates file). For comparison, the reported candidate alone at ``fpr`` and under the paper's LLR > 0;
    every variant sees the same noises."""
    from terd.defense.input_detection import CandidateSetDetector, InputDetector

    det = CandidateSetDetector(candidates, fpr=fpr)
    head = input_detection_metrics(det, r_true, g_true, n, generator_seed)
    alone = input_detection_metrics(InputDetector(candidates[reported], fpr=fpr), r_true, g_true, n, generator_seed)
    paper = input_detection_metrics(InputDetector(candidates[reported], fpr=None), r_true, g_true, n, generator_seed)
    out = {**head, "rule": "any kept candidate flags", "kept_candidates": det.kept, "candidates": len(candidates),
           "tnr_reported_candidate": alone["tnr"],
           "tnr_paper_rule": paper["tnr"]}
    if r_true is not None:
        out |= {"tpr_reported_candidate": alone["tpr"], "tpr_paper_rule": paper["tpr"]}
    return out


def input_tpr_bound(model_dir: str | Path, fpr: float) -> float:
    """The best TPR any noise-space detector can reach on this model's true trigger at ``fpr`` (Neyman-Pearson):
    the ceiling the input_TPR column is read against."""
    from terd.attacks import load_true_trigger
    from terd.defense.input_detection import best_possible_tpr
    from terd.defense.trigger import Trigger

    return round(best_possible_tpr(Trigger(*load_true_trigger(model_dir)), fpr), 6)


ATTACK_N = 64  # samples per attack-success measurement (triggered and clean each)


def attack_success(model_dir: str | Path, n: int = ATTACK_N, seed: int = 0, measured: dict | None = None,
                   device: str = "cpu") -> dict:
    """ASR of a backdoored model with every sampler its attack offers; the best one is the model's ASR (an
    attacker samples the way the backdoor fires). Clean ASR is that sampler's. A measurement only: nothing is
    written into ``model_dir`` (it may be a shipped or a user's model). ``measured``: {sampler: {"asr",
    "clean_asr", "attack"}} already measured with the same ``n`` and ``seed`` (not sampled again). Once a
    sampler reaches ASR 1.0 no other can do better, so the rest are not run (TrojDiff's 1000-step DDPM check
    after its DDIM one is the costliest measurement of a bench); the best and its clean ASR are those a full run
    picks."""
    from terd.attacks import evaluate_attack, load_attack
    from terd.attacks.trojdiff import SAMPLERS, TrojDiff

    attack = load_attack(model_dir)
    reps = dict(measured or {})
    order = SAMPLERS if isinstance(attack, TrojDiff) else (attack.sampler,)
    for name in order:
        if name not in reps and not any(rep["asr"] >= 1.0 for rep in reps.values()):
            rep = evaluate_attack(model_dir, n=n, seed=seed, sampler=name, device=device, write=False)
            reps[name] = {"asr": rep["triggered"]["asr"], "clean_asr": rep["clean"]["asr"], "attack": rep["description"]}
    # listed in the attack's sampler order, however they were measured
    reps = {name: reps[name] for name in sorted(reps, key=lambda name: order.index(name) if name in order else len(order))}
    best = max(reps, key=lambda name: reps[name]["asr"])
    return {**reps[best], "asr_sampler": best, "asr_by_sampler": {name: rep["asr"] for name, rep in reps.items()},
            "clean_asr_by_sampler": {name: rep["clean_asr"] for name, rep in reps.items()}, "measurements": reps}


SUCCESS_DIR = "attack-success"  # CACHE/attack-success/<id>.json: ASR kept across bench runs and output dirs


def success_key(where: Path, n: int, seed: int, device: str) -> dict:
    """What an attack-success measurement depends on: this build of the model, ``n``, seed and device."""
    return {"model": _model_fingerprint(where), "n": n, "seed": seed, "device": device}


def stored_success(cache: str | Path, entry_id: str, key: dict) -> dict:
    """{sampler: {"asr", "clean_asr", "attack"}} measured earlier under ``key`` (any bench run, any output
    directory), else {}. BadDiffusion's 1000-step check costs ~15 minutes per model at 32 px on 2 CPU cores: an
    interrupted or re-targeted run must not pay it again."""
    try:
        data = json.loads((Path(cache) / SUCCESS_DIR / f"{entry_id}.json").read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("key") == key and isinstance(data.get("measurements"), dict)
    return data["measurements"] if ok else {}


def store_success(cache: str | Path, entry_id: str, key: dict, measurements: dict) -> None:
    """Keep a model's attack-success measurements in the zoo cache (never in the model's own directory)."""
    path = Path(cache) / SUCCESS_DIR / f"{entry_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "measurements": measurements}, indent=2))
    tmp.replace(path)


def _earlier_success(model_dir: Path, row: dict) -> dict:
    """What a row saved before the per-sampler fields already measured (same n, seed): its ASR and clean ASR with
    its best sampler, or, from before ASR covered every sampler, with the attack's own."""
    from terd.attacks import load_attack

    sampler = row.get("asr_sampler") or load_attack(model_dir).sampler
    return {sampler: {k: row.get(k) for k in ("asr", "clean_asr", "attack")}}


def _lacks_success_fields(row: dict) -> bool:
    """A backdoored row from before ASR (and clean ASR) were recorded per sampler."""
    return row["backdoored"] and not {"asr_by_sampler", "clean_asr_by_sampler"} <= row.keys()


def evaluate_model(entry: ZooEntry, cache: str, defenses: tuple[str, ...], out: str, n_inputs: int = 10_000,
                   attack_n: int = ATTACK_N, seed: int = 0, threads: int | None = None,
                   input_fpr: float = INPUT_FPR, device: str = "cpu") -> dict:
    """Attack success (if backdoored) and every defense's raw output for one model."""
    from terd.defense.elijah import elijah_scan
    from terd.defense.reversion import reverse_trigger
    from terd.defense.trigger import save_candidates
    from terd.models import load_denoiser

    if threads:
        torch.set_num_threads(threads)
    where = model_dir(entry, cache)
    row: dict = {"id": entry.id, "kind": entry.kind, "family": entry.family, "dataset": entry.dataset,
                 "backdoored": entry.backdoored, "tags": list(entry.tags), "defenses": {}}
    r_true = g_true = None
    if entry.backdoored:
        from terd.attacks import load_true_trigger

        key = success_key(where, attack_n, seed, device)
        t0 = time.perf_counter()
        success = attack_success(where, attack_n, seed, device=device, measured=stored_success(cache, entry.id, key))
        store_success(cache, entry.id, key, success.pop("measurements"))
        row |= success | {"asr_seconds": round(time.perf_counter() - t0, 2)}  # near 0 when kept in the cache
        r_true, g_true = load_true_trigger(where)
    den = load_denoiser(where, device=device)
    for name in defenses:
        t0 = time.perf_counter()
        if name.startswith("terd-"):
            res = reverse_trigger(den, name.removeprefix("terd-"), seed=seed)
            trig = res.trigger
            d = {**res.features, "network_evaluations": res.network_evaluations + res.probe_evaluations,
                 "probe_evaluations": res.probe_evaluations, "patch_probe": res.patch_probe}
            trig.save(Path(out) / "triggers" / f"{entry.id}--{name}.safetensors")
            save_candidates(res.input_candidates, Path(out) / "triggers" / f"{entry.id}--{name}.candidates.safetensors")
            if r_true is not None:
                d["trigger_l2"] = float((trig.r - r_true).norm())
                reported = next(i for i, c in enumerate(res.candidates) if c["reported"])
                d["input_detection"] = input_detection_report(res.input_candidates, reported, r_true, g_true,
                                                              n_inputs, seed + 99, input_fpr)
        elif name == "elijah":
            res = elijah_scan(den, seed=seed)
            d = {"spread": res.spread, "clean_spread": res.clean_spread, "network_evaluations": res.network_evaluations}
            if r_true is not None:
                d["trigger_l2"] = float((res.tau - r_true).norm())
        else:
            raise TerdError(f"unknown defense {name!r} (available: {', '.join(DEFENSES)})")
        d["seconds"] = round(time.perf_counter() - t0, 2)
        row["defenses"][name] = d
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def with_localization(row: dict, where: Path) -> bool:
    """Give each terd defense of a row its L_p from the patch-probe summary it recorded (rows from before L_p
    existed hold the summary, not the feature; the probe is unchanged since); True when the row changed."""
    from terd.defense.reversion import probe_features

    changed = False
    for d in row["defenses"].values():
        probe = d.get("patch_probe")
        if "L_p" in d or not probe or probe.get("leading_support") is None:
            continue
        if "elements" not in probe:
            from terd.models import load_denoiser

            probe["elements"] = math.prod(load_denoiser(where).image_shape)
        d.update(probe_features(probe))
        changed = True
    return changed


# --------------------------------------------------------------------------------------------------
# Decisions with honest thresholds, and metrics
# --------------------------------------------------------------------------------------------------

def _z(values: list[float], x: float) -> float:
    m, s = statistics.fmean(values), statistics.stdev(values)
    return (x - m) / s if s > 0 else (math.inf if x > m else -math.inf if x < m else 0.0)


def population(row: dict) -> str:
    """The group a row's thresholds are fitted in (zoo.populations; a row without one: its dataset)."""
    return row.get("population") or row["dataset"]


SHIPPED = "shipped"  # --thresholds shipped: what `terd scan` uses for each model's architecture


def fixed_thresholds(spec: str | Path | Thresholds, entries: list[ZooEntry], cache: Path,
                     defenses: tuple[str, ...]) -> dict[str, dict[str, Thresholds | None]]:
    """{terd defense: {model id: thresholds}} for a held-out judgement: one file for every model (its
    preset's defense), or the entry terd ships for each model's architecture (None where it ships none)."""
    from terd.defense.calibration import default_thresholds
    from terd.models import load_denoiser

    terd = [d for d in defenses if d.startswith("terd-")]
    if not terd:
        raise TerdError("--thresholds judges terd's defenses; none of them is among --defenses")
    if isinstance(spec, Thresholds) or str(spec) != SHIPPED:
        thr = spec if isinstance(spec, Thresholds) else Thresholds.load(spec)
        preset = thr.provenance.get("preset")
        if preset is None and len(terd) > 1:
            raise TerdError(f"{spec}: the thresholds do not say which preset they were fitted for "
                            f"(provenance.preset), and --defenses runs {', '.join(terd)}")
        name = f"terd-{preset}" if preset else terd[0]
        if name not in terd:
            raise TerdError(f"{spec}: fitted for preset {preset!r}, but --defenses has no {name}")
        return {name: {e.id: thr for e in entries}}
    out: dict[str, dict[str, Thresholds | None]] = {d: {} for d in terd}
    for e in entries:
        den = load_denoiser(model_dir(e, cache))
        for d in terd:
            out[d][e.id] = default_thresholds(d.removeprefix("terd-"), model=den)
    return out


def _not_judged(row: dict, thr: Thresholds | None, cache: Path | None) -> str | None:
    """Why these thresholds cannot judge this model (none for its architecture; it is in their fit, by zoo id
    or by the path `terd calibrate` records), or None when they can."""
    if thr is None:
        return "no thresholds for its architecture"
    fitted = {str(m) for m in thr.provenance.get("models", [])}  # and any feature fitted on other models:
    fitted |= {str(m) for st in thr.provenance.get("stats", {}).values() for m in st.get("models", [])}
    where = (cache / row["id"]).resolve() if cache is not None else None
    if row["id"] in fitted or (where is not None and any(Path(m).resolve() == where for m in fitted if "/" in m)):
        return "in the fit"
    return None


def decide_fixed(rows: list[dict], defense: str, fixed: dict[str, Thresholds | None], cache: Path | None) -> None:
    """``decision`` per row by thresholds fitted elsewhere; score: the largest margin in the fit's std units."""
    from terd.defense.model_detection import detect_model

    for row in rows:
        if defense not in row["defenses"]:
            continue
        d, thr = row["defenses"][defense], fixed.get(row["id"])
        if why := _not_judged(row, thr, cache):
            d["decision"] = {"flagged": None, "score": None, "note": f"not judged: {why}"}
        else:
            v = detect_model({f: d[f] for f in FEATURES if f in d}, thr)
            margins = v.margin_std or v.margin
            d["decision"] = {"flagged": v.verdict == "backdoored", "score": max(margins.values()),
                             "flagged_by": v.flagged_by, "cuts": v.thresholds, "fitted_on": thr.provenance.get("models", []),
                             "thresholds_source": thr.provenance.get("source", "")}


def decide(rows: list[dict], defense: str, k: float = 3.0) -> None:
    """Add ``decision`` (flagged, score, fitted_on) per row for one defense, leave-one-out for benign rows."""
    for row in rows:
        if defense not in row["defenses"]:
            continue
        ref = [r for r in rows if not r["backdoored"] and population(r) == population(row) and r["id"] != row["id"]
               and defense in r["defenses"]]
        d = row["defenses"][defense]
        if len(ref) < 2:
            d["decision"] = {"flagged": None, "score": None, "fitted_on": [r["id"] for r in ref],
                             "note": "fewer than 2 other benign models: no threshold"}
            continue
        if defense == "elijah":
            vals = [r["defenses"][defense]["spread"] for r in ref]
            score = -_z(vals, d["spread"])  # low spread = uniform generations = backdoor-like
            flagged = d["spread"] < statistics.fmean(vals) - k * statistics.stdev(vals)
            by = ["spread"] if flagged else []
        else:
            feats = [f for f in FEATURES if f in d and all(f in r["defenses"][defense] for r in ref)]
            # the benign-only rule as `terd calibrate` fits it (mean + k std); the cuts also pick input candidates
            cuts = fit_thresholds([{f: r["defenses"][defense][f] for f in feats} for r in ref], k=k).values()
            score = max(_z([r["defenses"][defense][f] for r in ref], d[f]) for f in feats)
            by = [f for f in feats if d[f] > cuts[f]]
            flagged = bool(by)
        d["decision"] = {"flagged": bool(flagged), "score": score, "flagged_by": by, "fitted_on": [r["id"] for r in ref]}
        if defense != "elijah":
            d["decision"]["cuts"] = cuts


def _rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _auc(pos: list[float], neg: list[float]) -> float | None:
    if not pos or not neg:
        return None
    from sklearn.metrics import roc_auc_score

    clean = [max(min(v, 1e9), -1e9) for v in pos + neg]
    return round(float(roc_auc_score([1] * len(pos) + [0] * len(neg), clean)), 4)


def _headline(inp: dict) -> dict:
    """A model's input-detection result as terd runs it: over the candidates its verdict implicates, else any."""
    return inp.get("by_verdict") or inp


def summarise(rows: list[dict], defenses: tuple[str, ...], min_asr: float) -> dict:
    """Per defense x dataset x family: TPR, TNR, AUC, input detection, fidelity, cost."""
    excluded = [r["id"] for r in rows if r["backdoored"] and r.get("asr", 0) < min_asr]
    used = [r for r in rows if r["id"] not in excluded]
    table = []
    for defense in defenses:
        for dataset in sorted({population(r) for r in used}):
            benign = [r for r in used if population(r) == dataset and not r["backdoored"]]
            neg_scores = [r["defenses"][defense]["decision"]["score"] for r in benign
                          if r["defenses"].get(defense, {}).get("decision", {}).get("score") is not None]
            tnr = _rate([not r["defenses"][defense]["decision"]["flagged"] for r in benign
                         if r["defenses"].get(defense, {}).get("decision", {}).get("flagged") is not None])
            groups: dict[str, list[dict]] = {}
            for r in used:
                if population(r) == dataset and r["backdoored"]:
                    key = r["family"] + (" (adaptive/robustness)" if r["tags"] else "")
                    groups.setdefault(key, []).append(r)
            for family, members in sorted(groups.items()):
                ds = [m["defenses"][defense] for m in members if defense in m["defenses"]]
                flags = [d["decision"]["flagged"] for d in ds if d.get("decision", {}).get("flagged") is not None]
                inp = [d["input_detection"] for d in ds if "input_detection" in d]
                table.append({
                    "defense": defense, "dataset": dataset, "family": family, "models": len(members),
                    "benign_models": len(benign), "TPR": _rate(flags), "TNR": tnr,
                    "AUC": _auc([d["decision"]["score"] for d in ds if d.get("decision", {}).get("score") is not None],
                                neg_scores),
                    "input_TPR": round(min(_headline(i)["tpr"] for i in inp), 4) if inp else None,
                    "input_TNR": round(min(_headline(i)["tnr"] for i in inp), 4) if inp else None,
                    "input_TPR_any": round(min(i["tpr"] for i in inp), 4) if inp else None,
                    "input_TPR_rep": (round(min(i["tpr_reported_candidate"] for i in inp), 4)
                                      if inp and all("tpr_reported_candidate" in i for i in inp) else None),
                    "input_TPR_bound": (round(min(m["input_tpr_bound"] for m in members), 4)
                                        if inp and all("input_tpr_bound" in m for m in members) else None),
                    "trigger_l2": round(statistics.fmean(d["trigger_l2"] for d in ds), 3) if ds else None,
                    "evals": round(statistics.fmean(d["network_evaluations"] for d in ds)) if ds else None,
                    "seconds": round(statistics.fmean(d["seconds"] for d in ds), 1) if ds else None,
                })
            ds = [r["defenses"][defense] for r in benign if defense in r["defenses"]]
            if not groups and ds:  # a zoo of benign models only (a held-out check): its TNR is the result
                table.append({c: None for c in TABLE_COLUMNS} | {
                    "defense": defense, "dataset": dataset, "family": "(benign models only)", "models": 0,
                    "benign_models": len(benign), "TNR": tnr,
                    "evals": round(statistics.fmean(d["network_evaluations"] for d in ds)),
                    "seconds": round(statistics.fmean(d["seconds"] for d in ds), 1)})
    return {"excluded_attacks_that_do_not_fire": excluded, "min_asr": min_asr, "table": table,
            "model_seconds": model_seconds(rows)}


def _model_cost(row: dict) -> float:
    return sum(d["seconds"] for d in row["defenses"].values()) + row.get("asr_seconds", 0)


def time_left(rows: list[dict], pending: list[ZooEntry], workers: int, groups: dict[str, str]) -> str:
    """", about 1:05:00 left": the pending models' cost at the median of recorded rows of the same population
    (``groups``: id -> zoo.populations' group; a network's cost, as its thresholds, is its own) and kind (this run's
    and reused rows), shared by the workers; empty until every pending kind has a recorded row."""
    from datetime import timedelta

    def kind(i: str, dataset: str, backdoored: bool) -> tuple[str, bool]:
        return groups.get(i, dataset), backdoored

    costs: dict[tuple[str, bool], list[float]] = {}
    for r in rows:
        costs.setdefault(kind(r["id"], r["dataset"], r["backdoored"]), []).append(_model_cost(r))
    wanted = [kind(e.id, e.dataset, e.backdoored) for e in pending]
    if not wanted or any(k not in costs for k in wanted):
        return ""
    need = sum(statistics.median(costs[k]) for k in wanted) / workers
    return f", about {timedelta(seconds=round(need))} left at the per-model medians so far"


def model_seconds(rows: list[dict]) -> dict:
    """What one model's evaluation cost a worker, per population and kind: its defenses' seconds plus (backdoored)
    the attack-success check, as recorded (a check reused from the zoo cache costs ~0). Medians and ranges, so a
    run's length can be forecast from its zoo."""
    out: dict = {}
    for pop in sorted({population(r) for r in rows}):
        for kind, backdoored in (("benign", False), ("backdoored", True)):
            members = [r for r in rows if population(r) == pop and r["backdoored"] == backdoored]
            totals = [_model_cost(r) for r in members]
            if not totals:
                continue
            stats = {"models": len(totals), "median": round(statistics.median(totals), 1),
                     "min": round(min(totals), 1), "max": round(max(totals), 1)}
            if backdoored and (checks := [r["asr_seconds"] for r in members if "asr_seconds" in r]):
                stats["asr_check_median"] = round(statistics.median(checks), 1)
            out.setdefault(pop, {})[kind] = stats
    return out


def model_seconds_line(costs: dict) -> str:
    """``model_seconds`` in words: 'digits16: benign 232 s (median of 5, 212-248), backdoored ...'."""
    parts = []
    for pop, kinds in costs.items():
        words = [f"{kind} {c['median']:,.0f} s (median of {c['models']}, {c['min']:,.0f}-{c['max']:,.0f}"
                 + (f"; its ASR check {c['asr_check_median']:,.0f} s" if "asr_check_median" in c else "") + ")"
                 for kind, c in kinds.items()]
        parts.append(f"{pop}: " + ", ".join(words))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Files: JSON, CSV, markdown, plots
# --------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ["defense", "dataset", "family", "models", "benign_models", "TPR", "TNR", "AUC", "input_TPR",
                 "input_TNR", "input_TPR_any", "input_TPR_rep", "input_TPR_bound", "trigger_l2", "evals", "seconds"]


def runs_here(meta: dict) -> list[dict]:
    """The runs into a report's output directory that evaluated models of this report (an ``--only`` report
    shares its directory with the runs of other parts of the zoo)."""
    ids = {e["id"] for e in meta.get("entries", [])}
    return [r for r in meta.get("runs", []) if r.get("evaluated") and (not ids or ids & set(r["evaluated"]))]


def _runs_line(meta: dict) -> list[str]:
    """Every run into this output directory that evaluated models of this report: when, how long, how many (a
    run that also evaluated models outside an ``--only`` report says how many of its models are here)."""
    ids = {e["id"] for e in meta.get("entries", [])}
    if not (runs := runs_here(meta)):
        return []

    def models(r: dict) -> str:
        here = len(ids & set(r["evaluated"])) if ids else len(r["evaluated"])
        return f"{here} model(s)" + (f" ({len(r['evaluated'])} in that run)" if here < len(r["evaluated"]) else "")

    line = "Runs that evaluated models here: " + "; ".join(
        f"{r['finished'][:16].replace('T', ' ')} UTC, {r['seconds']} s"
        + (f" ({r['build_seconds']} s building)" if r.get("build_seconds") is not None else "")
        + f" with {r['workers']} worker(s), {models(r)}" for r in runs) + "."
    timed = {i for r in runs for i in r["evaluated"]}
    if untimed := [e["id"] for e in meta.get("entries", []) if e["id"] not in timed]:
        line += f" Evaluated in runs that recorded no time (interrupted, or from before run times were kept): {', '.join(untimed)}."
    return [line, ""]


def _fixed_line(meta: dict) -> list[str]:
    """How the held-out thresholds (``--thresholds``) were made and which models they judged."""
    spec = meta.get("thresholds")
    if not spec:
        return []
    parts = []
    for defense, fits in spec["fits"].items():
        for f in fits:
            parts.append(f"{defense}: {f['source']} (fitted on {', '.join(f['models']) or 'unrecorded models'}) "
                         f"judges {', '.join(f['judges'])}")
        if spec["unjudged"].get(defense):
            parts.append(f"{defense} does not judge {', '.join(spec['unjudged'][defense])}")
    return [f"Held-out thresholds (`--thresholds {spec['spec']}`): terd's decisions use thresholds fitted on "
            "models outside this run's judgement (a model inside the fit is not judged); " + "; ".join(parts) + ".",
            ""]


def describe_fixed(spec: str | Path, fixed: dict[str, dict[str, Thresholds | None]], rows: list[dict],
                   cache: Path) -> dict:
    """For the report: each distinct fit, the models it judges, and those it does not (in the fit; no fit)."""
    out: dict = {"spec": str(spec), "fits": {}, "unjudged": {}}
    for defense, per_model in fixed.items():
        fits: dict[str, dict] = {}
        for row in rows:
            thr = per_model.get(row["id"])
            if why := _not_judged(row, thr, cache):
                out["unjudged"].setdefault(defense, []).append(f"{row['id']} ({why})")
            else:
                same = json.dumps(thr.to_dict(), sort_keys=True, default=str)  # shipped: loaded once per model
                fit = fits.setdefault(same, {"source": thr.provenance.get("source", str(spec)),
                                                "models": [str(m) for m in thr.provenance.get("models", [])],
                                                "cuts": thr.values(), "judges": []})
                fit["judges"].append(row["id"])
        out["fits"][defense] = list(fits.values())
    return out


def _markdown(summary: dict, rows: list[dict], meta: dict) -> str:
    lines = ["# terd bench report", "",
             f"Zoo: `{meta['zoo']}`"
             + (f" (only the models matching {', '.join(meta['only'])}, the bases they need built; leave-one-out "
                "thresholds are fitted on the benign models among them)" if meta.get("only") else "")
             + f"; defenses: {', '.join(meta['defenses'])}; {len(rows)} models; "
             f"wall time {meta['seconds']:.0f} s with {meta['workers']} worker(s) on {meta['machine']}"
             + (f", models on {meta['device']}" if meta.get("device", "cpu") != "cpu" else "")
             + (f"; {len(meta['reused_rows'])} model(s) reused from an earlier run with the same settings "
                f"(not in that time): {', '.join(meta['reused_rows'])}." if meta.get("reused_rows") else "."), "",
             *_runs_line(meta),
             *_fixed_line(meta),
             ("Otherwise thresholds" if meta.get("thresholds") else "Thresholds") + ": fitted per dataset (split by network where a dataset holds several: a [preset] "
             "suffix) on benign models only (mean + 3 std of each feature; Elijah: "
             "mean - 3 std of generation spread). A benign model is judged by thresholds fitted on the other "
             "benign models (leave-one-out); a backdoored model by all benign models. Input detection "
             "(input_TPR/TNR), as `terd scan` and `check-inputs` run it: an input is flagged when any of the k scan "
             "candidates the verdict implicates (on a model flagged through the patch probe, L_p or W_p: the probe's "
             "candidate and the reversion candidates whose M_r or V_r, read outside the probe's window, cross their "
             "thresholds) flags it, each at "
             f"FPR {meta.get('input_fpr', INPUT_FPR):g} / k from the closed-form benign law (union bound: at most "
             f"{meta.get('input_fpr', INPUT_FPR):g} in all, so the measured FPR stays <= 0.1%); a model not flagged, "
             "or whose verdict implicates none, uses every candidate that could be a trigger (their detector catches "
             ">= half of their own inputs), as input_TPR_any does for every model; input_TPR_rep: the "
             "reported candidate alone at the same FPR; input_TPR_bound: the most any detector of x_T alone can "
             f"catch at FPR {meta.get('input_fpr', INPUT_FPR):g} (the true trigger's own likelihood-ratio test, "
             "most powerful by Neyman-Pearson; closed form), so input_TPR is read against it. Worst model of each "
             "row shown.", "",
             "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for t in summary["table"]:
        lines.append("| " + " | ".join("" if t[c] is None else str(t[c]) for c in TABLE_COLUMNS) + " |")
    exc = summary["excluded_attacks_that_do_not_fire"]
    lines += ["", f"Backdoored models excluded because their attack does not fire (ASR < {summary['min_asr']}): "
              + (", ".join(exc) if exc else "none"), "",
              "One model's evaluation on one worker (its defenses, and a backdoored model's attack-success check; "
              "a check reused from the zoo cache counts ~0): " + model_seconds_line(summary["model_seconds"]) + ".",
              "", *_verdict_lines(rows), "## Attack success", "",
              "ASR: the best of the samplers the attack offers (each listed with its clean ASR; one that reaches 1.0 "
              "ends the list, as no other can do better); clean ASR with that sampler.", "",
              "| model | attack | ASR | clean ASR | ASR per sampler |", "|---|---|---|---|---|"]
    for r in rows:
        if r["backdoored"]:
            clean = r.get("clean_asr_by_sampler", {})
            per = ", ".join(f"{k} {v}" + (f" (clean {clean[k]})" if k in clean else "")
                            for k, v in r.get("asr_by_sampler", {}).items())
            lines.append(f"| {r['id']} | {r.get('attack', '')} | {r.get('asr')} | {r.get('clean_asr')} | {per} |")
    return "\n".join(lines) + "\n"


def _verdict_lines(rows: list[dict]) -> list[str]:
    """Per model and terd defense: its features, the verdict and the features over their cut (which one caught it
    matters: a patch model caught by L_p alone is not a model the KL features see)."""
    lines = ["## Verdicts per model", "", "Features of each terd scan; flagged_by: the features over their threshold.",
             "", "| model | truth | ASR | defense | " + " | ".join(FEATURES) + " | verdict | flagged_by |",
             "|---|---|---|---|" + "---|" * len(FEATURES) + "---|---|"]
    for r in rows:
        for name, d in r["defenses"].items():
            if not name.startswith("terd-"):
                continue  # Elijah's spread is in the table above
            dec = d.get("decision", {})
            verdict = dec.get("note") or {True: "backdoored", False: "benign", None: ""}[dec.get("flagged")]
            feats = " | ".join("" if d.get(f) is None else f"{d[f]:.4g}" for f in FEATURES)
            lines.append(f"| {r['id']} | {'backdoored' if r['backdoored'] else 'benign'} | {'' if r.get('asr') is None else r['asr']} | {name} | "
                         f"{feats} | {verdict} | {', '.join(dec.get('flagged_by', []))} |")
    return [*lines, ""]


def _feature_scatter(ax, rows: list[dict], defense: str, fx: str, fy: str,  # noqa: ANN001
                     excluded: frozenset[str] = frozenset()) -> None:
    """Benign vs backdoored models on two KL features, with the cuts backdoored models are judged by
    (held-out thresholds, else mean + 3 std over all benign models of the dataset; benign models are then
    judged leave-one-out)."""
    groups = (("benign", "tab:blue", lambda r: not r["backdoored"]),
              ("backdoored", "tab:red", lambda r: r["backdoored"] and r["id"] not in excluded),
              ("backdoor does not fire", "tab:grey", lambda r: r["id"] in excluded))
    for label, colour, member in groups:
        pts = [(r["defenses"][defense][fx], r["defenses"][defense][fy]) for r in rows if member(r)]
        if pts:
            ax.scatter(*zip(*pts, strict=True), c=colour, label=label, s=18)
    benign = [r["defenses"][defense] for r in rows if not r["backdoored"]]
    cuts = [c for r in rows if (c := r["defenses"][defense]["decision"].get("cuts")) is not None]
    if cuts and all(c == cuts[0] for c in cuts):  # one held-out fit (--thresholds) judges these models
        for f, line in ((fx, ax.axvline), (fy, ax.axhline)):
            if f in cuts[0]:
                line(cuts[0][f], color="grey", ls="--", lw=0.8)
    elif len(benign) >= 2:
        for f, line in ((fx, ax.axvline), (fy, ax.axhline)):
            vals = [d[f] for d in benign]
            line(statistics.fmean(vals) + 3 * statistics.stdev(vals), color="grey", ls="--", lw=0.8)
    for f, axis in ((fx, "x"), (fy, "y")):  # log only when the values span a decade (else unreadable ticks)
        vals = [r["defenses"][defense][f] for r in rows if r["defenses"][defense][f] > 0]
        if vals and max(vals) > 10 * min(vals):
            getattr(ax, f"set_{axis}scale")("log")
    ax.set(xlabel=fx, ylabel=fy)
    ax.legend(fontsize="small")


def _plots(rows: list[dict], defenses: tuple[str, ...], out: Path, excluded: frozenset[str] = frozenset()) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    files = []
    for dataset in sorted({population(r) for r in rows}):
        sub = [r for r in rows if population(r) == dataset]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-")
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for defense in defenses:
            pts = [(r["backdoored"], r["defenses"][defense]["decision"]["score"]) for r in sub
                   if r["defenses"].get(defense, {}).get("decision", {}).get("score") is not None
                   and r["id"] not in excluded]  # as the table's AUC: backdoors that do not fire are left out
            if len({p[0] for p in pts}) == 2:
                fpr, tpr, _ = roc_curve([p[0] for p in pts], [max(min(p[1], 1e9), -1e9) for p in pts])
                ax.plot(fpr, tpr, label=defense)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"model detection ROC — {dataset}")
        if ax.get_legend_handles_labels()[0]:  # no curve without both benign and backdoored scores
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"roc_{slug}.png", dpi=120)
        plt.close(fig)
        files.append(f"roc_{slug}.png")
        for defense in [d for d in defenses if d.startswith("terd-")]:
            scored = [r for r in sub if defense in r["defenses"]]
            pairs = [("M_r", f) for f in FEATURES[1:] if scored and all(f in r["defenses"][defense] for r in scored)]
            if not pairs:
                continue
            fig, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), squeeze=False)
            for ax, (fx, fy) in zip(axes[0], pairs, strict=True):
                _feature_scatter(ax, scored, defense, fx, fy, excluded)
            fig.suptitle(f"{defense} features — {dataset}")
            fig.tight_layout()
            fig.savefig(out / f"scatter_{defense}_{slug}.png", dpi=120)
            plt.close(fig)
            files.append(f"scatter_{defense}_{slug}.png")
    return files


def _gallery(rows: list[dict], cache: Path, out: Path, defense: str) -> str | None:
    from terd.attacks import load_true_trigger
    from terd.defense.trigger import Trigger
    from terd.imaging import save_grid

    pairs = []
    for r in rows:
        f = out / "triggers" / f"{r['id']}--{defense}.safetensors"
        if r["backdoored"] and f.is_file():
            true_r, _ = load_true_trigger(cache / r["id"])
            rev = Trigger.load(f).r
            pairs += [(true_r / 2).clamp(-1, 1), (rev / 2).clamp(-1, 1)]  # one row per model: true | reversed
    if not pairs:
        return None
    if len({p.shape for p in pairs}) != 1:  # mixed resolutions: one gallery per dataset would be needed
        return None
    save_grid(torch.stack(pairs), out / f"gallery_{defense}.png", nrow=2)
    return f"gallery_{defense}.png"


def verdict_input_detection(rows: list[dict], defense: str, out: Path, model_dirs: dict[str, Path],
                            meta: dict) -> None:
    """Input detection as ``terd scan`` then ``check-inputs`` run it on a flagged model: over the candidates the
    verdict implicates (terd.defense.implicated), on the same noises as the worker's any-candidate measurement
    (closed form and saved candidates, no network). Kept as ``input_detection["by_verdict"]``; a model that is
    not flagged, or whose verdict implicates none, keeps the any-candidate rule. ``model_dirs``: where each
    model (its true trigger) is."""
    from terd.attacks import load_true_trigger
    from terd.defense.implicated import implicated_candidates
    from terd.defense.input_detection import CandidateSetDetector
    from terd.defense.trigger import load_candidates

    for row in rows:
        d = row["defenses"].get(defense, {})
        inp, dec = d.get("input_detection"), d.get("decision", {})
        if inp is not None:
            inp.pop("by_verdict", None)  # judged afresh by this report's thresholds
        path = out / "triggers" / f"{row['id']}--{defense}.candidates.safetensors"
        if not (row["backdoored"] and inp and dec.get("flagged") and dec.get("cuts") and path.is_file()):
            continue
        cands = load_candidates(path)
        probe = (d.get("patch_probe") or {}).get("candidate_index")
        implicated = implicated_candidates(cands, dec["cuts"], probe, d)
        if not implicated:
            continue
        fpr = meta.get("input_fpr", INPUT_FPR)
        r_true, g_true = load_true_trigger(model_dirs[row["id"]])
        det = CandidateSetDetector(cands, fpr=fpr, implicated=implicated)
        met = input_detection_metrics(det, r_true, g_true, inp.get("n", meta.get("n_inputs", 10_000)),
                                      meta.get("seed", 0) + 99)
        inp["by_verdict"] = {"candidates": implicated, "tpr": met["tpr"], "tnr": met["tnr"]}


def write_report(rows: list[dict], defenses: tuple[str, ...], out: Path, meta: dict, min_asr: float,
                 cache: Path, fixed: dict[str, dict[str, Thresholds | None]] | None = None,
                 model_dirs: dict[str, Path] | None = None) -> dict:
    """``fixed``: {defense: {model id: thresholds}} fitted elsewhere (fixed_thresholds); other defenses are
    judged leave-one-out. ``model_dirs``: where each model is (default ``cache / id``)."""
    model_dirs = {r["id"]: Path(cache) / r["id"] for r in rows} | (model_dirs or {})
    for d in defenses:
        if fixed and d in fixed:
            decide_fixed(rows, d, fixed[d], cache)
        else:
            decide(rows, d)
        if d.startswith("terd-"):
            verdict_input_detection(rows, d, out, model_dirs, meta)
    summary = summarise(rows, defenses, min_asr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "models": rows}, indent=2,
                                                 default=str))
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "dataset", "family", "backdoored", "asr", "defense", "M_r", "V_r", "P_r", "L_p", "W_p", "spread", "flagged",
                    "score", "trigger_l2", "input_tpr", "input_tnr", "input_tpr_reported_candidate", "input_tpr_bound", "evals", "seconds", "peak_rss_mb"])
        for r in rows:
            for name, d in r["defenses"].items():
                dec, inp = d.get("decision", {}), d.get("input_detection", {})
                w.writerow([r["id"], r["dataset"], r["family"], r["backdoored"], r.get("asr"), name, d.get("M_r"),
                            d.get("V_r"), d.get("P_r"), d.get("L_p"), d.get("W_p"), d.get("spread"), dec.get("flagged"), dec.get("score"), d.get("trigger_l2"),
                            inp.get("tpr"), inp.get("tnr"), inp.get("tpr_reported_candidate"), r.get("input_tpr_bound"),
                            d["network_evaluations"], d["seconds"], r["peak_rss_mb"]])
    (out / "report.md").write_text(_markdown(summary, rows, meta))
    meta["plots"] = _plots(rows, defenses, out, frozenset(summary["excluded_attacks_that_do_not_fire"]))
    for d in defenses:
        if d.startswith("terd-") and (g := _gallery(rows, cache, out, d)):
            meta["plots"].append(g)
    return summary


def _model_fingerprint(model_dir: Path) -> str:
    """Changes when the cached model is rebuilt (its training and attack records change); for a model terd
    did not build (no train.json), when any of its files changes size or modification time."""
    parts = [(model_dir / name).read_text() for name in ("train.json", "attack.json") if (model_dir / name).is_file()]
    if not parts:
        parts = [f"{f.relative_to(model_dir)} {f.stat().st_size} {f.stat().st_mtime_ns}"
                 for f in sorted(model_dir.rglob("*")) if f.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


LATE_ENTRY_FIELDS = ("path", "data", "unet")  # zoo entry fields added after rows were recorded


def _entry_key(entry: ZooEntry) -> dict:
    """The entry as a row's settings key. Late fields are left out while unset (None or empty), so rows
    recorded before they existed stay valid."""
    return {k: v for k, v in asdict(entry).items()
            if k != "evaluate" and (v or k not in LATE_ENTRY_FIELDS)}  # evaluate: whether, not how


def _reversion_configs(defenses) -> dict:  # noqa: ANN001
    """Every terd defense's full reversion settings: a row made by another version of a preset is not reused."""
    from terd.defense.reversion import get_config

    return {d: asdict(get_config(d.removeprefix("terd-"))) for d in defenses if d.startswith("terd-")}


def _cached_row(path: Path, key: dict) -> dict | None:
    """A model's earlier evaluation, if it was made with the same settings on the same model."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data["row"] if isinstance(data, dict) and data.get("key") == key and "row" in data else None


def _save_row(out: Path, key: dict, row: dict) -> None:
    """OUT/rows/<id>.json: a model's evaluation with the settings it was made under (what a rerun may reuse)."""
    (out / "rows" / f"{row['id']}.json").write_text(json.dumps({"key": key, "row": row}, indent=2, default=str))


RUN_FIELDS = {"finished", "seconds", "workers", "evaluated"}  # build_seconds: runs since it was kept


def _earlier_runs(out: Path) -> list[dict]:
    """The runs recorded in OUT's previous report (a report from before runs were kept gives its last run, dated by
    its file), so a rerun that only reuses rows does not erase what evaluating them cost."""
    try:
        meta = json.loads((out / "results.json").read_text())["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if "runs" in meta:
        runs = meta["runs"]
        ok = isinstance(runs, list) and all(isinstance(r, dict) and RUN_FIELDS <= r.keys() for r in runs)
        return list(runs) if ok else []  # an edited or damaged record is dropped, not a crash
    done = set(meta.get("reused_rows", []))
    mtime = datetime.fromtimestamp((out / "results.json").stat().st_mtime, timezone.utc)
    return [{"finished": mtime.isoformat(timespec="seconds"), "seconds": meta.get("seconds"),
             "workers": meta.get("workers"), "machine": meta.get("machine"),
             "evaluated": [e["id"] for e in meta.get("entries", []) if e["id"] not in done]}]


def run_bench(zoo_file: str | Path, out: str | Path, *, defenses: tuple[str, ...] = ("terd-fast", "elijah"),
              cache: str | Path | None = None, workers: int = 1, n_inputs: int = 10_000, min_asr: float = 0.9,
              input_fpr: float = INPUT_FPR, seed: int = 0, device: str = "cpu", data: str | Path | None = None,
              thresholds: str | Path | None = None, only: tuple[str, ...] = (),
              echo: Callable[[str], None] = print) -> dict:
    """Build (or reuse) the zoo, run the defenses on every model in a process pool, write the report.

    ``only``: id patterns (``d16-*``): a part of the zoo (:func:`~terd.zoo.select_entries`); its rows are those
    a full run makes, so a full run into the same ``out`` reuses them.

    ``device``: where models train and are scanned (e.g. ``cuda`` for the full-scale zoo); ``data``
    replaces the zoo file's training data (a local dataset path, e.g. a CIFAR-10 directory); ``thresholds``
    (a thresholds file, or ``"shipped"``) judges terd's defenses by thresholds fitted elsewhere instead of
    leave-one-out over the zoo's benign models.

    Each model's evaluation is saved in ``OUT/rows/<id>.json`` as it finishes, so a rerun after an
    interruption only evaluates what is missing (or what changed: settings, or a rebuilt model)."""
    for d in defenses:
        if d not in DEFENSES:
            raise TerdError(f"unknown defense {d!r} (available: {', '.join(DEFENSES)})")
    if workers < 1:
        raise TerdError("--workers must be at least 1")
    if not 0.0 < input_fpr < 1.0:
        raise TerdError(f"--input-fpr must be in (0, 1), got {input_fpr}")
    given = thresholds  # a file is read once, now: a bad one fails before the scans
    if thresholds is not None and str(thresholds) != SHIPPED:
        given = Thresholds.load(thresholds)
    entries = select_entries(load_zoo(zoo_file, data=data), only)
    cache = cache_dir(zoo_file, cache)
    out = Path(out)
    (out / "triggers").mkdir(parents=True, exist_ok=True)
    (out / "rows").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    build_zoo(entries, cache, workers=workers, device=device, echo=echo)
    built = time.perf_counter() - t0  # the run's time splits into building and evaluating (the report says so)
    entries = [e for e in entries if e.evaluate]  # the rest are bases built for others (zoo: evaluate false)
    threads = max(1, (os.cpu_count() or 1) // workers)
    rows: dict[str, dict] = {}
    reversion = _reversion_configs(defenses)
    keys = {e.id: json.loads(json.dumps(  # as it reads back from JSON (tuples become lists)
        # the reversion's features; L_p is recomputed from the probe summary a row records (with_localization)
        {"defenses": list(defenses), "features": list(KL_FEATURES), "n_inputs": n_inputs, "input_fpr": input_fpr, "seed": seed, "entry": _entry_key(e),
         "model": _model_fingerprint(model_dir(e, cache)), "reversion": reversion},
        default=str)) for e in entries}
    for e in entries:
        if (row := _cached_row(out / "rows" / f"{e.id}.json", keys[e.id])) is not None:
            rows[e.id] = row
            echo(f"  reused {e.id} (evaluated earlier)")
    reused = list(rows)
    stale = [e for e in entries if e.id in rows and _lacks_success_fields(rows[e.id])]
    success_keys = {e.id: success_key(model_dir(e, cache), ATTACK_N, seed, device) for e in stale}
    with ProcessPoolExecutor(max_workers=workers, max_tasks_per_child=1, mp_context=pool_context(device)) as pool:
        # rows from before ASR was recorded per sampler: only the attack is re-evaluated (what the row or the
        # cache already holds is not sampled again), the defenses stay
        for e, success in zip(stale, pool.map(attack_success, [str(model_dir(e, cache)) for e in stale],
                                              [ATTACK_N] * len(stale), [seed] * len(stale),
                                              [_earlier_success(model_dir(e, cache), rows[e.id])
                                               | stored_success(cache, e.id, success_keys[e.id]) for e in stale],
                                              [device] * len(stale)), strict=True):
            if (measurements := success.pop("measurements", None)) is not None:
                store_success(cache, e.id, success_keys[e.id], measurements)
            rows[e.id] |= success
            _save_row(out, keys[e.id], rows[e.id])
            echo(f"  attack success per sampler completed for {e.id} ({success['asr_sampler']}: {success['asr']})")
        futures = {pool.submit(evaluate_model, e, str(cache), tuple(defenses), str(out), n_inputs, ATTACK_N, seed,
                               threads, input_fpr, device): e for e in entries if e.id not in rows}
        started, groups = time.perf_counter(), populations(entries)
        for i, f in enumerate(as_completed(futures), 1):
            e = futures[f]
            rows[e.id] = f.result()
            _save_row(out, keys[e.id], rows[e.id])
            pending = [p for p in futures.values() if p.id not in rows]
            echo(f"  evaluated {e.id} {how_far(i, len(futures), started)}"
                 f"{time_left(list(rows.values()), pending, workers, groups)}")
    for e in entries:  # closed form / recorded, no network: also filled in on rows recorded before they existed
        changed = with_localization(rows[e.id], model_dir(e, cache))
        if rows[e.id]["backdoored"] and "input_tpr_bound" not in rows[e.id]:
            rows[e.id]["input_tpr_bound"] = input_tpr_bound(model_dir(e, cache), input_fpr)
            changed = True
        if changed:
            _save_row(out, keys[e.id], rows[e.id])
    meta = {"zoo": str(zoo_file), "defenses": list(defenses), "workers": workers, "cache": str(cache),
            "seconds": round(time.perf_counter() - t0, 1), "build_seconds": round(built, 1),
            "n_inputs": n_inputs, "input_fpr": input_fpr,
            "seed": seed, "device": device, "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
            **({"only": list(only)} if only else {}),
            "entries": [asdict(e) for e in entries], "reused_rows": reused}
    meta["runs"] = _earlier_runs(out) + [{
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": meta["seconds"],
        "build_seconds": meta["build_seconds"], "workers": workers, "machine": meta["machine"],
        "evaluated": [e.id for e in entries if e.id not in reused]}]
    for e_id, pop in populations(entries).items():  # report-time: the zoo decides who is compared with whom
        rows[e_id]["population"] = pop
    ordered = [rows[e.id] for e in entries]
    fixed = fixed_thresholds(given, entries, cache, tuple(defenses)) if given is not None else None
    if fixed is not None:
        meta["thresholds"] = describe_fixed(thresholds, fixed, ordered, cache)
    return write_report(ordered, tuple(defenses), out, meta, min_asr, cache, fixed,
                        {e.id: model_dir(e, cache) for e in entries})
