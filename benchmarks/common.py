"""Helpers shared by the benchmark scripts: medians of repeated timings and JSON + markdown output."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_seconds_interleaved(fns: list[Callable[[], object]], repeats: int = 5) -> list[float]:
    """Median seconds of each function, timed in turn per repeat so machine-load drift hits all alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t0)
    return [statistics.median(bucket) for bucket in times]


def noise_level(schedule, t: int) -> float:  # noqa: ANN001
    """sigma_t = sqrt((1 - abar_t) / abar_t): step t's noise level in VE units (what a VE model is called at)."""
    abar = schedule.alphas_cumprod[t]
    return float(((1 - abar) / abar).sqrt())


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def render_recorded(ap, stem: Path, to_markdown: Callable[[dict], str]) -> None:  # noqa: ANN001
    """--render: rewrite STEM.md from the recorded STEM.json alone (one-line exit 2 when nothing is recorded)."""
    path = stem.with_suffix(".json")
    if not path.is_file():
        ap.error(f"{path}: nothing recorded to render")
    stem.with_suffix(".md").write_text(to_markdown(json.loads(path.read_text())))


def write_results(name: str, rows: list[dict], columns: list[str], notes: str = "") -> Path:
    """benchmarks/results/NAME.json (rows + machine) and NAME.md (a table a person reads)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    lines = [f"# {name}", "", f"Machine: {machine()}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{name}.md"


def fast_features(row: dict, localization: dict[str, float]) -> dict:
    """A bench row's terd-fast features with L_p: the row's own, else from the probe support it recorded, else the
    value bench_localization.py recomputed for the model with this id (rows made before the support was recorded)."""
    from terd.defense.reversion import probe_features

    d = row["defenses"]["terd-fast"]
    if "L_p" in d:
        return d
    probe = d.get("patch_probe") or {}
    if probe.get("leading_support") is not None and "elements" in probe:
        return {**d, **probe_features(probe)}
    return {**d, "L_p": localization[row["id"]]} if row["id"] in localization else d


def recomputed_localization() -> dict[str, float]:
    """{model id: L_p} from benchmarks/results/localization.json (bench_localization.py)."""
    rows = json.loads((RESULTS / "localization.json").read_text())["rows"]
    return {r["model"]: r["L_p"] for r in rows if r["L_p"] is not None}


def with_window_fit(thresholds, family: str):  # noqa: ANN001, ANN201
    """``thresholds`` with W_p (the patch probe's window excess) fitted on the family's W_p fit models, from
    bench_window_search.py's results (the KL features' fit models are not on disk to probe)."""
    from terd.defense.model_detection import refit_feature

    rows = [r for r in json.loads((RESULTS / "window_search.json").read_text())["rows"]
            if r["family"] == family and r["role"] == "fit"]
    return refit_feature(thresholds, "W_p", [r["W_p"] for r in rows], [r["model"] for r in rows])


def measured_success(path: Path, cache: Path | None = None) -> dict:
    """Attack success of a model dir (terd.bench.attack_success at its defaults), reusing the measurement a zoo
    bench stored for this build when ``path`` lies in that bench's ``cache`` (default: runs/zoo-cache)."""
    from terd.bench import ATTACK_N, attack_success, stored_success, success_key

    cache = cache or Path(__file__).resolve().parents[1] / "runs/zoo-cache"
    key = success_key(path, ATTACK_N, 0, "cpu")  # attack_success's defaults
    measured = stored_success(cache, path.name, key) if path.parent == cache else {}
    return attack_success(path, measured=measured)


def build_attack_model(name: str, out: Path, kind: str, options: dict, shape: tuple, data_name: str, base: Path,
                       epochs: int | None, retrain: bool, **finetune: object) -> float | None:
    """Fine-tune ``base`` with one attack into ``out`` unless a finished model is there (or ``retrain``).

    Returns the seconds the whole ``attack_model`` call took (what ``terd attack`` costs: training, preview
    grid, saving), or None when the finished model was reused.
    """
    from terd.attacks import attack_model, build_attack

    if not retrain and (out / "attack.json").is_file() and (out / "model_index.json").is_file():
        return None
    t0 = time.perf_counter()
    attack = build_attack(kind, shape, data_name=data_name, **options)
    print(f"[{name}] training {attack.describe()}", flush=True)
    attack_model(attack, base, out, epochs=epochs, overwrite=True, progress=sys.stderr.isatty(), **finetune)
    return round(time.perf_counter() - t0, 1)


def backdoor_under_test(models_dir: Path, names: tuple[str, ...], backdoored: str) -> tuple[dict, torch.Tensor]:
    """Stop unless every model is built; then the backdoored model's attack success (terd bench's measurement,
    printed) and its true trigger r: what an EDM study reads its statistics against."""
    from terd.attacks import load_true_trigger
    from terd.bench import attack_success

    for name in names:
        if not (models_dir / name / "model_index.json").is_file():
            raise SystemExit(f"{models_dir / name} is missing: build it first (see the docstring)")
    success = attack_success(models_dir / backdoored)
    print(success, flush=True)
    return success, load_true_trigger(models_dir / backdoored)[0]
