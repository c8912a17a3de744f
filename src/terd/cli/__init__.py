"""The ``terd`` command line: a thin layer over the public API (one module of commands per area).

Every command turns a :class:`~terd.errors.TerdError` (bad path, corrupt file, wrong shape...) into one
line on stderr and exit code 2; ``terd --debug CMD`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer

from terd.errors import TerdError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Protect diffusion models against backdoors: train, attack, scan, check inputs.")
_state = {"debug": False}
F = TypeVar("F", bound=Callable)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"terd: error: {message}", err=True)
    return typer.Exit(code)


def command(fn: F) -> F:
    """Register a command whose user errors become one line + exit 2 (tracebacks only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN202
        try:
            return fn(*args, **kwargs)
        except TerdError as exc:
            if _state["debug"]:
                raise
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return app.command()(wrapper)


def resolve_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TerdError("--device cuda requested but no CUDA device is available")
    return device


DeviceOpt = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available).")]


def main() -> None:
    """Entry point of the `terd` script."""
    try:
        app()
    except BrokenPipeError:  # e.g. `terd info M | head`
        sys.exit(0)




# Command modules register themselves on import (kept last: they need `app` and `command`).
from terd.cli import attacks, bench, defense, foundation  # noqa: E402, F401
