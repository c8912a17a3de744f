"""Refit the shipped W_p cuts alone, from bench_window_search.py's latest results, leaving every other feature as
shipped.

W_p (the excess explained offset on the patch probe's window) moves when the probe's rule does -- since the shape rule
the search's boxes are at least 2 x 2, so the clean fit models' search windows read other values -- while the KL
features and L_p do not need a refit: the KL features come from the reversion, and L_p's cut was fitted under the
rule before, where every clean model read 1.0-3.2; under the shape rule a clean model without a patch-shaped first
look reads 1, so the kept cut is the more lenient one. fit_fast_defaults.py / fit_dc_defaults.py refit every
feature from the recorded benches; this touches W_p only.

Run (after bench_window_search.py): .venv/bin/python benchmarks/refit_window_cuts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import with_window_fit  # noqa: E402

from terd.defense.calibration import default_thresholds, install_defaults  # noqa: E402

ENTRIES = {"fast": "tiny-digits16", "fast@tiny-photos32-dc": "tiny-photos32-dc"}


def main() -> None:
    for key, family in ENTRIES.items():
        shipped = default_thresholds(key)
        if shipped is None:
            raise SystemExit(f"no shipped entry {key!r}")
        refit = with_window_fit(shipped, family)
        install_defaults(refit, key)
        print(f"{key}: W_p {shipped.W_p:.4f} -> {refit.W_p:.4f} (other features unchanged)", flush=True)


if __name__ == "__main__":
    main()
