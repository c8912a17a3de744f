"""The foundation commands as a user meets them: real processes, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

ASSET = Path(__file__).resolve().parents[1] / "src/terd/assets/models/digits-benign"


def terd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "terd", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(res: subprocess.CompletedProcess, fragment: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert fragment in lines[0]


def test_help_lists_commands():
    res = terd("--help")
    assert res.returncode == 0
    for cmd in ("train", "sample", "info", "demo"):
        assert cmd in res.stdout


def test_sample_from_given_initial_noise(tmp_path):
    noise = torch.randn(4, 1, 16, 16)
    save_file({"x": noise}, tmp_path / "noise.safetensors")
    res = terd("sample", ASSET, "--out", tmp_path / "g.png", "--init", tmp_path / "noise.safetensors",
               "--sampler", "ddim", "--steps", "5")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "g.png").is_file() and "4 samples" in res.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["info", "no/such/dir/x"], "no such model"),
        (["sample", "{asset}", "--out", "{tmp}/g.jpg"], "must be a .png"),
        (["sample", "{asset}", "--out", "{tmp}/g.png", "--init", "{tmp}/wrong.npy"], "expected N x 1 x 16 x 16"),
        (["sample", "{asset}", "--out", "{tmp}/g.png", "--init", "{tmp}/corrupt.safetensors"], "corrupt"),
        (["train", "--out", "{tmp}/m", "--preset", "huge"], "unknown preset"),
        (["train", "--out", "{tmp}/m", "--data", "{tmp}/nothing"], "unknown dataset"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, fragment):
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 16, 16), np.float32))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 20)
    res = terd(*[a.format(asset=ASSET, tmp=tmp_path) for a in args])
    assert_one_line_error(res, fragment)


def test_debug_flag_shows_the_traceback():
    res = terd("--debug", "info", "no/such/dir/x")
    assert res.returncode != 0 and "Traceback" in res.stderr
