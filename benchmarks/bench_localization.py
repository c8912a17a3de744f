"""L_p, the patch probe's localization, of every model on disk: recomputed, and checked against what committed
reports recorded.

L_p = the image's element count over the effective support of the leading principal component of the model's
nonlinear response to benign noise at t = T - 1 (terd.defense.model_detection.localization; the patch probe's first
look at the scan's seed 0, 512 forward passes). Model detection gained it because no TERD candidate lands on a
TrojDiff patch, while the patch model's response is confined to the patch (patch_probe.md). The shipped fits
(fit_dc_defaults.py, fit_fast_defaults.py) read L_p from bench rows where a scan recorded the support and from
here for models scanned before it was recorded; ``same_as_recorded`` checks that the two agree where both exist
(bench rows, patch_probe.json). Backdoored models carry their recorded attack success (n 64, the attack's best
sampler): the zoo's stored measurement, else bench_patch_probe's row; none is measured here.

Models: every model of runs/zoo-cache, the demo's, the digits16 patch models (bench_patch_probe.py's recipes) and
the two digits16 VE models (another architecture: listed, fitted nowhere). Missing models are skipped and said so.

Run: .venv/bin/python benchmarks/bench_localization.py → localization.md / .json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from terd.bench import ATTACK_N, stored_success, success_key  # noqa: E402
from terd.defense.calibration import architecture, preset_architecture  # noqa: E402
from terd.defense.model_detection import localization  # noqa: E402
from terd.defense.patch_probe import first_look, probe_generator  # noqa: E402
from terd.models import load_denoiser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src/terd/assets/models"
CACHE = ROOT / "runs/zoo-cache"
EXTRA = [ASSETS / "digits-benign", ASSETS / "demo-benign", ASSETS / "demo-trojdiff", ROOT / "runs/patch24",
         ROOT / "runs/patch24-s1", ROOT / "runs/zoo-digits16-ve/ve-benign-s0-e40",
         ROOT / "runs/zoo-digits16-ve/ve-villan-ode"]
SUCCESS = ("asr", "clean_asr", "asr_sampler")
FAMILIES = ("tiny-digits16", "tiny-photos32-dc")


def recorded_success(path: Path, probe_rows: dict[str, dict]) -> dict:
    """The attack success a zoo bench stored for this build, else bench_patch_probe's row for the model."""
    if path.parent == CACHE and (got := stored_success(CACHE, path.name, success_key(path, ATTACK_N, 0, "cpu"))):
        best = max(got, key=lambda name: got[name]["asr"])  # as terd.bench.attack_success picks
        return {"asr": got[best]["asr"], "clean_asr": got[best]["clean_asr"], "asr_sampler": best}
    row = probe_rows.get(path.name, {})
    return {k: row.get(k) for k in SUCCESS}


def recorded_supports() -> dict[str, float]:
    """Leading supports committed reports recorded, by model id (bench rows; bench_patch_probe's table)."""
    out = {r["model"]: r["leading_support"] for r in json.loads((RESULTS / "patch_probe.json").read_text())["rows"]
           if r.get("leading_support") is not None}
    for f in sorted(RESULTS.glob("*/results.json")):
        for row in json.loads(f.read_text())["models"]:
            for d in row["defenses"].values():
                if (d.get("patch_probe") or {}).get("leading_support") is not None:
                    out[row["id"]] = d["patch_probe"]["leading_support"]
    return out


def main() -> None:
    torch.set_num_threads(2)
    layouts = {name: preset_architecture(name) for name in FAMILIES}
    recorded = recorded_supports()
    probe_rows = {r["model"]: r for r in json.loads((RESULTS / "patch_probe.json").read_text())["rows"]}
    models = sorted(p for p in CACHE.iterdir() if (p / "model_index.json").is_file()) + EXTRA
    rows = []
    for path in models:
        if not (path / "model_index.json").is_file():
            print(f"skip {path.relative_to(ROOT)} (not on disk)", flush=True)
            continue
        den = load_denoiser(path)
        layout = architecture(den)
        family = next((n for n, a in layouts.items() if a == layout), "other")
        row = {"model": path.name, "path": str(path.relative_to(ROOT)), "family": family,
               "backdoored": (path / "true_trigger.safetensors").is_file()}
        if row["backdoored"]:
            row |= recorded_success(path, probe_rows)
        t0 = time.perf_counter()
        _, support, _ = first_look(den, probe_generator(0))
        support = None if support is None else round(support, 1)  # as a scan's report records it
        elements = math.prod(den.image_shape)
        row |= {"elements": elements, "leading_support": support, "L_p": localization(support, elements),
                "recorded_support": recorded.get(path.name),
                "same_as_recorded": None if path.name not in recorded else recorded[path.name] == support,
                "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(row, flush=True)
    differ = [r["model"] for r in rows if r["same_as_recorded"] is False]
    write_results("localization", rows, ["model", "family", "backdoored", "asr", "clean_asr", "asr_sampler", "elements",
                                         "leading_support", "L_p", "recorded_support", "same_as_recorded", "seconds"],
                  notes=(f"{len(rows)} models on disk; {sum(r['same_as_recorded'] is not None for r in rows)} with a "
                         f"support a committed report recorded, of which {len(differ)} differ"
                         f"{' (' + ', '.join(differ) + ')' if differ else ''}. L_p = elements / leading_support; "
                         "asr: attack success (n 64) with the attack's best sampler. Seconds ran beside other work."))


if __name__ == "__main__":
    main()
