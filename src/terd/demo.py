"""``terd demo`` / ``make demo``: the main job on the embedded default, no user data, no network.

The demo models ship inside the package (``terd/assets/models``), each made by a recorded terd recipe
(``assets/models/RECIPES.md``), so the demo needs no training time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from terd.errors import TerdError
from terd.imaging import save_grid
from terd.models import load_denoiser
from terd.sampling import initial_noise, sample_images

ASSETS = Path(__file__).resolve().parent / "assets" / "models"


def asset_model(name: str) -> Path:
    path = ASSETS / name
    if not (path / "model_index.json").is_file():
        raise TerdError(f"demo model {name!r} is missing from the installation ({path})")
    return path


def run_demo(out: str | Path, *, echo: Callable[[str], None] = print, n: int = 16) -> dict:
    """Load the shipped benign digits model and write a grid of its samples; returns what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    den = load_denoiser(asset_model("digits-benign"))
    samples = sample_images(den, initial_noise(n, den.image_shape, seed=0), sampler="ddpm")
    grid = save_grid(samples, out / "benign-samples.png")
    echo(f"benign tiny-digits16 model: {den.num_parameters():,} parameters; samples -> {grid}")
    return {"benign_samples": str(grid)}
