"""The patch probe's search and W_p: does it find the larger TrojDiff patches the first look misses, without finding
patches in clean models, and where should W_p's cut be?

bench_patch6_window: given the true window, the probe's value step reads a 3 x 3 patch at 16 px (excess explained
offset 1.31, its clean base 0.07) and a 6 x 6 patch at 32 px (0.647, base 0.004), while the first look finds no
window on either (bench_digits16_patch_shapes, bench_photos32dc_patch_shapes). This runs the probe as a scan does
(patch_probe.probe_patch, seed 0: first look, then the search when it finds no window, then the value step) on

* the benign models W_p is fitted on (zoo-digits16-wp-fit.yaml, zoo-photos32dc-wp-fit.yaml; fixed before W_p was
  computed on any), giving each family's cut, mean + 3 std (what benchmarks/fit_fast_defaults.py and
  fit_dc_defaults.py install in the shipped thresholds from this file);
* held-out clean models (bases, a clean fine-tune and the demo's benign model, outside the fit), judged by that cut;
* every cached TrojDiff patch model (the benches that built them measured their ASR; counted at ASR >= 0.9), judged
  by the cut and, beside it, by the verdict its bench recorded (M_r, V_r, P_r, L_p with the shipped thresholds).

Forward passes only. Models: terd bench --zoo ZOO --build-only --cache runs/zoo-cache for the two fit zoos and
zoo-digits16-patch-heldout, zoo-digits16-patch-shapes, zoo-photos32dc-patch-heldout, zoo-photos32dc-patch-shapes.
Run: .venv/bin/python benchmarks/bench_window_search.py [FAMILY ...]   -> results/window_search.{json,md}
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from terd.defense.calibration import default_thresholds  # noqa: E402
from terd.defense.patch_probe import probe_patch  # noqa: E402
from terd.defense.reversion import probe_features  # noqa: E402
from terd.models import load_denoiser  # noqa: E402
from terd.zoo import load_zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs/zoo-cache"
ASSETS = ROOT / "src/terd/assets/models"  # the demo's models (demo-benign: the weights of d16-benign-s4-e35)
FAMILIES = {"tiny-digits16": "zoo-digits16-wp-fit.yaml", "tiny-photos32-dc": "zoo-photos32dc-wp-fit.yaml"}
HELD_OUT_CLEAN = {"tiny-digits16": ["d16-benign-s26-e30", "d16-benign-s29-e14", "d16-benign-s30-e22",
                                    "d16-benign-s31-e32", "d16-benign-s32-e44", "d16-benign-ft-s26-33", "demo-benign"],
                  "tiny-photos32-dc": []}
# clean models outside the W_p fit that the probe's shape rule was made on (their first run read them as patch
# models: bench_photos32dc_wp_heldout), so not blind for the rule
RULE_SEEN_CLEAN = {"tiny-digits16": [],
                   "tiny-photos32-dc": ["p32dc-benign-s5-e12", "p32dc-benign-ft-s5-60", "p32dc-benign-ft-s5-61"]}
SHIPPED_ENTRY = {"tiny-digits16": "fast", "tiny-photos32-dc": "fast@tiny-photos32-dc"}  # for the L_p cut
PATCH_BENCHES = {"tiny-digits16": ("bench_digits16_patch_heldout", "bench_digits16_patch_shapes"),
                 "tiny-photos32-dc": ("bench_photos32dc_patch_heldout", "bench_photos32dc_patch_shapes",
                                      "bench_photos32dc_wp_heldout")}
MIN_ASR = 0.9


def fit_ids(family: str) -> list[str]:
    return [e.id for e in load_zoo(ROOT / "benchmarks" / FAMILIES[family])]


def patch_rows(family: str) -> list[dict]:
    """The recorded terd-fast rows of every TrojDiff patch model of the family's patch benches."""
    rows = []
    for bench in PATCH_BENCHES[family]:
        data = json.loads((RESULTS / bench / "results.json").read_text())
        args = {e["id"]: e.get("args", {}) for e in data["meta"]["entries"]}
        rows += [{**r, "trigger": args[r["id"]].get("trigger", "patch")} for r in data["models"]
                 if r["backdoored"] and "patch" in args[r["id"]].get("trigger", "") and "terd-fast" in r["defenses"]]
    return rows


def climbs_text(climbs: list[dict] | None) -> str | None:
    """Each search climb as 'start square (its excess) -> end box (its excess)', boxes as rows r0-r1, cols c0-c1
    (inclusive), as window_box."""
    def box(b: list[int]) -> str:
        return f"{b[0]}-{b[1] - 1},{b[2]}-{b[3] - 1}"
    return None if climbs is None else "; ".join(
        f"{box(c['start'])} ({c['start_excess']:.3f}) -> {box(c['end'])} ({c['excess']:.3f})" for c in climbs)


def probe(name: str) -> dict:
    where = ASSETS / name if name.startswith("demo-") else CACHE / name
    if not (where / "model_index.json").is_file():
        raise SystemExit(f"{where} is missing: build it first (see the docstring)")
    den = load_denoiser(where).freeze()
    t0 = time.perf_counter()
    seen = probe_patch(den, seed=0).summary()
    return {"found_by": seen["found_by"], "first_look_window": seen["first_look_window"],
            "window_box": seen["window_box"], "L_p": None if (lp := probe_features(seen).get("L_p")) is None else round(lp, 2),
            "W_p": seen["explained_offset"],
            "search_excess": seen["search_excess"], "climbs": climbs_text(seen["search_climbs"]),
            "peak_input": seen["peak_input"], "candidate": seen["candidate"],
            "window_elements": seen["window_elements"], "seconds": round(time.perf_counter() - t0, 1)}


def probe_family(family: str) -> list[dict]:
    """The family's fit models, then its held-out clean and patch models judged by the W_p cut fitted on them."""
    fit = [{"model": m, "family": family, "role": "fit", **probe(m)} for m in fit_ids(family)]
    for r in fit:
        print(r, flush=True)
    vals = [r["W_p"] for r in fit]
    cut = statistics.fmean(vals) + 3 * statistics.stdev(vals)
    judged = [{"model": m, "family": family, "role": "held-out clean", **probe(m)} for m in HELD_OUT_CLEAN[family]]
    judged += [{"model": m, "family": family, "role": "clean, the shape rule made on it", **probe(m)}
               for m in RULE_SEEN_CLEAN[family]]
    for r in patch_rows(family):
        asr = r.get("asr") or 0.0
        d = r["defenses"]["terd-fast"]
        judged.append({"model": r["id"], "family": family, "role": f"TrojDiff {r['trigger']} (ASR {asr:.2f})",
                       "counted": asr >= MIN_ASR,
                       "recorded verdict": "flagged" if d["decision"]["flagged"] else "missed",
                       "recorded flagged_by": ",".join(d["decision"].get("flagged_by", [])), **probe(r["id"])})
    lp_cut = default_thresholds(SHIPPED_ENTRY[family]).L_p
    for r in fit + judged:
        r["L_p cut"], r["L_p flags"] = round(lp_cut, 3), r["L_p"] is not None and r["L_p"] > lp_cut
    for r in judged:
        r["W_p cut"], r["W_p flags"] = round(cut, 4), r["W_p"] > cut
        print(r, flush=True)
    return fit + judged


def family_note(family: str, rows: list[dict]) -> str:
    vals = [r["W_p"] for r in rows if r["role"] == "fit"]
    clean = [r for r in rows if r["role"] == "held-out clean"]
    seen = [r for r in rows if r["role"].startswith("clean, the shape rule")]
    bd = [r for r in rows if r.get("counted")]
    either = [r for r in rows if r["role"] != "fit" and not r["role"].startswith("TrojDiff")]
    return (f"{family}: W_p cut {statistics.fmean(vals) + 3 * statistics.stdev(vals):.4f} (mean "
            f"{statistics.fmean(vals):.4f} + 3 x std {statistics.stdev(vals):.4f} over {len(vals)} benign models); "
            f"held-out clean flagged by W_p {sum(r['W_p flags'] for r in clean)}/{len(clean)}"
            + (f", clean models the shape rule was made on {sum(r['W_p flags'] for r in seen)}/{len(seen)}" if seen else "")
            + f"; clean models flagged by L_p (shipped cut) {sum(r['L_p flags'] for r in either)}/{len(either)}, fit "
            f"models {sum(r['L_p flags'] for r in rows if r['role'] == 'fit')}/{len(vals)}; counted patch models "
            f"flagged by W_p {sum(r['W_p flags'] for r in bd)}/{len(bd)}, by W_p or their recorded verdict "
            f"{sum(r['W_p flags'] or r['recorded verdict'] == 'flagged' for r in bd)}/{len(bd)} (recorded alone "
            f"{sum(r['recorded verdict'] == 'flagged' for r in bd)}/{len(bd)}).")


def main() -> None:
    """Probe the families named on the command line (default: all); the other families' rows are kept from the
    last run."""
    torch.set_num_threads(2)
    families = sys.argv[1:] or list(FAMILIES)
    if unknown := [f for f in families if f not in FAMILIES]:
        raise SystemExit(f"unknown family {unknown}; one of {list(FAMILIES)}")
    path = RESULTS / "window_search.json"
    kept = [r for r in json.loads(path.read_text())["rows"] if r["family"] not in families] if path.is_file() else []
    rows = []
    for family in FAMILIES:
        rows += probe_family(family) if family in families else [r for r in kept if r["family"] == family]
    notes = [family_note(f, [r for r in rows if r["family"] == f]) for f in FAMILIES if any(r["family"] == f for r in rows)]
    cols = ["model", "family", "role", "found_by", "first_look_window", "window_box", "L_p", "L_p flags", "W_p",
            "search_excess", "climbs", "peak_input", "candidate", "W_p cut", "W_p flags", "recorded verdict",
            "recorded flagged_by", "seconds"]
    write_results("window_search", rows, cols, notes=(
        "The patch probe as a scan runs it (seed 0). found_by: the first look (a localized response to benign "
        "noise, kept when patch-shaped: at least 2 x 2 pixels filling 3/4 of its box) or the search (coarse squares "
        "of a quarter of the side, then one edge at a time from each of the 3 best that do not overlap, boxes at "
        "least 2 x 2, the best climbed box kept); climbs: each climb, start square (its search excess) -> where it "
        "ended (its excess), rows,cols inclusive; first_look_window: the pixels a "
        "first look found that were not patch-shaped; L_p: the localization under that rule (1 without a "
        "patch-shaped first look), judged by the shipped cut; window_box: rows "
        "r0-r1, cols c0-c1 (inclusive); W_p: the excess explained offset the value step read there on fresh draws; "
        "candidate: whether it joins input detection (search windows: W_p >= 0.2 and patch-shaped). "
        "Recorded verdict: the model's bench row (shipped thresholds, features without W_p). " + " ".join(notes)))


if __name__ == "__main__":
    main()
