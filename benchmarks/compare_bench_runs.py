"""Does a rebuilt model score what its earlier build scored? Compares two recorded `terd bench` runs model by model.

For every model id in both runs' results.json: the largest relative difference of terd-fast's KL features
(M_r, V_r, P_r), both runs' attack success, and both verdicts. Rebuilds from the same recipe can differ
(thread count and float reduction order change a training trajectory); this says how much, per model.
Run: .venv/bin/python benchmarks/compare_bench_runs.py [NEW_DIR OLD_DIR]   (default: the core run vs the 29-model run)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

FEATURES = ("M_r", "V_r", "P_r")


def _models(bench_dir: str) -> dict[str, dict]:
    return {m["id"]: m for m in json.loads((RESULTS / bench_dir / "results.json").read_text())["models"]}


def main() -> None:
    new_dir, old_dir = sys.argv[1:3] if len(sys.argv) >= 3 else ("bench_digits16_core", "bench_digits16")
    new, old = _models(new_dir), _models(old_dir)
    rows = []
    for mid in (m for m in new if m in old):
        a, b = new[mid]["defenses"]["terd-fast"], old[mid]["defenses"]["terd-fast"]
        rel = max(abs(a[f] - b[f]) / abs(b[f]) for f in FEATURES if f in a and f in b)
        rows.append({"model": mid, "family": new[mid]["family"], "max_rel_feature_diff": f"{rel:.1e}",
                     "asr_new": new[mid].get("asr"), "asr_old": old[mid].get("asr"),
                     "flagged_new": a["decision"]["flagged"], "flagged_old": b["decision"]["flagged"]})
    write_results("bench_rebuild_comparison", rows,
                  ["model", "family", "max_rel_feature_diff", "asr_new", "asr_old", "flagged_new", "flagged_old"],
                  notes=(f"New run `{new_dir}/` against the earlier `{old_dir}/`, models with the same id and recipe. "
                         "max_rel_feature_diff: the largest |new - old| / |old| over terd-fast's M_r, V_r, P_r; "
                         "flagged: each run's verdict with its own leave-one-out thresholds."))


if __name__ == "__main__":
    main()
