"""Hand `terd bench` the attack-success measurements bench_quick_finetune.py and bench_attacks.py already made of
the models a zoo copied from them, so the bench does not sample them again.

The bench keeps ASR in CACHE/attack-success/<id>.json keyed by the model's build, n, seed and device; an entry
there is what `bench.attack_success` measured earlier. Both scripts measured their models with the same
function (`evaluate_attack`, seed 0, CPU) and n = 64 = `bench.ATTACK_N`; BadDiffusion's 1000-step sampler costs
13-40 minutes per model at 32 px on 2 CPU cores (quick_finetune_photos32.md, eval_seconds), ~6 at 16 px. A
measurement is handed over only when the cached model is the one that row built: its train.json records the same
training seconds (to 0.01 s), epochs and batch, and the same attack. Samplers a row
did not measure (e.g. TrojDiff's other one) are left for the bench to measure.

Run: .venv/bin/python benchmarks/reuse_quick_asr.py --cache runs/zoo-cache [--zoo photos32dc-heldout|digits16-matrix]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

from terd.bench import ATTACK_N, store_success, stored_success, success_key  # noqa: E402

# zoo -> (results file, {zoo id: the row of that file that built and measured the model})
COPIED = {"photos32dc-heldout": ("quick_finetune_photos32.json", {
    "p32dc-bd-box-shoe": "bad-box-shoe-b16-e3-np (base p32dc-s0-e20)",
    "p32dc-bd-stop-hat": "bad-stop-hat-b16-e3-np (base p32dc-s0-e20)",
    "p32dc-bd-stop-shoe": "bad-stop-shoe-b16-e3-np (base p32dc-s0-e20)",
    "p32dc-bd-box-corner": "bad-box-corner-b16-e3-np (base p32dc-s0-e20)",
    "p32dc-bd-stop-corner": "bad-stop-corner-b16-e3-np (base p32dc-s0-e20)",
    "p32dc-troj-d2i-blend": "troj-d2i-b16-e3-np (base p32dc-s0-e20)",
}), "digits16-matrix": ("attacks_digits16.json", {
    "d16-bd-box-shoe": "bd-box-shoe",
    "d16-bd-stop-hat": "bd-stop-hat",
    "d16-bd-stop-corner": "bd-stop-corner",
    "d16-troj-in-d2d-patch": "troj-in-d2d-patch",
    "d16-troj-out-d2d-patch": "troj-out-d2d-patch",
})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True, help="the zoo cache the bench runs on")
    ap.add_argument("--zoo", choices=sorted(COPIED), default="photos32dc-heldout",
                    help="which zoo's copies (benchmarks/zoo-NAME.yaml)")
    args = ap.parse_args()
    results, copied = COPIED[args.zoo]
    doc = json.loads((RESULTS / results).read_text())
    rows = doc.get("rows") or doc["results"]
    for zoo_id, row_name in copied.items():
        where, row = args.cache / zoo_id, rows[row_name]
        train = json.loads((where / "train.json").read_text())
        attack = json.loads((where / "attack.json").read_text())
        same = (train.get("seconds") == row["train_seconds"] and train.get("epochs") == row["epochs"]
                and train.get("batch_size") == row["batch_size"] and attack.get("attack") == row["attack"]
                and all(attack.get(k) == v for k, v in row["options"].items()))
        if not same or row["n"] != ATTACK_N:
            print(f"{zoo_id}: not the model {row_name!r} measured (or another n); left for the bench", file=sys.stderr)
            continue
        key = success_key(where, ATTACK_N, 0, "cpu")
        measured = stored_success(args.cache, zoo_id, key)
        measured[row["sampler"]] = {"asr": row["asr_triggered"], "clean_asr": row["asr_clean"],
                                    "attack": row["description"]}
        store_success(args.cache, zoo_id, key, measured)
        print(f"{zoo_id}: {row['sampler']} ASR {row['asr_triggered']} / clean {row['asr_clean']} from {row_name!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
