"""Benchmark command: every defense on every model of a zoo, with honest thresholds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from terd.cli import DeviceOpt, command, resolve_device
from terd.errors import TerdError
from terd.rates import INPUT_FPR


@command
def bench(
    zoo: Annotated[Path, typer.Option("--zoo", help="Zoo file (YAML), e.g. benchmarks/zoo-tiny.yaml.")],
    out: Annotated[Path, typer.Option("--out", help="Report directory (JSON, CSV, markdown, plots).")],
    defenses: Annotated[str, typer.Option(help="Comma-separated: terd-fast, terd-paper, elijah.")] = "terd-fast,elijah",
    workers: Annotated[int, typer.Option(help="Models evaluated in parallel (local process pool).")] = 1,
    cache: Annotated[Path | None, typer.Option(help="Where zoo models are built and cached.")] = None,
    n_inputs: Annotated[int, typer.Option(help="Benign and backdoor noises per model for input detection.")] = 10_000,
    input_fpr: Annotated[float, typer.Option(help="Input detection: false-positive rate the threshold is set for.")] = INPUT_FPR,
    min_asr: Annotated[float, typer.Option(help="Backdoored models below this attack success are excluded.")] = 0.9,
    build_only: Annotated[bool, typer.Option(help="Only build (or finish building) the zoo.")] = False,
    data: Annotated[Path | None, typer.Option(help="Training data for the zoo's builds (a local image folder, "
                                              "CIFAR-10 directory or .npz), replacing the zoo file's 'data'.")] = None,
    only: Annotated[str | None, typer.Option(
        help="Comma-separated id patterns (e.g. 'd16-*'): bench only these zoo models (the bases they need "
             "are built, not scanned); a later full run into the same --out reuses their rows.")] = None,
    device: DeviceOpt = None,
    thresholds: Annotated[str | None, typer.Option(
        help="Judge terd's defenses by thresholds fitted elsewhere (a held-out split): a thresholds file "
             "(`terd calibrate`), or 'shipped' for the ones `terd scan` uses on each model's architecture. "
             "Default: leave-one-out over the zoo's benign models.")] = None,
) -> None:
    """Build the zoo (cached, resumable) and run the defenses on every model; write the report."""
    from terd.bench import run_bench
    from terd.zoo import build_zoo, cache_dir, load_zoo, select_entries

    earlier_bench = (out / "results.json").is_file() or (out / "rows").is_dir()  # a report, or an interrupted run
    if out.exists() and any(out.iterdir()) and not earlier_bench:
        raise TerdError(f"{out}: directory is not empty and holds no earlier bench run; choose another --out")
    names = tuple(d.strip() for d in defenses.split(",") if d.strip())
    patterns = tuple(p.strip() for p in (only or "").split(",") if p.strip())
    if only is not None and not patterns:
        raise TerdError("--only needs at least one id pattern, e.g. --only 'd16-*'")
    dev = resolve_device(device)
    if build_only:
        build_zoo(select_entries(load_zoo(zoo, data=data), patterns), cache_dir(zoo, cache), workers=workers,
                  device=dev, echo=typer.echo)
        return
    summary = run_bench(zoo, out, defenses=names, cache=cache, workers=workers, n_inputs=n_inputs, min_asr=min_asr,
                        input_fpr=input_fpr, device=dev, data=data, thresholds=thresholds, only=patterns,
                        echo=typer.echo)
    for row in summary["table"]:
        typer.echo(f"{row['defense']:>10} {row['dataset']:>9} {row['family']:<32} TPR {row['TPR']} TNR {row['TNR']} "
                   f"AUC {row['AUC']}")
    typer.echo(f"report: {out / 'report.md'}")
