"""terd: protect diffusion models against backdoor attacks (TERD, ICML 2024, and beyond).

The public API, one idea per module:

- :mod:`terd.models` — load any supported network as a :class:`Denoiser` (predicted unit noise + schedule).
- :mod:`terd.sampling` — DDPM / DDIM samplers as plain functions over a denoiser.
- :mod:`terd.data` — offline default datasets and the user's own images.
- :mod:`terd.train` — one training loop (clean, or with an attack plugged in).
"""

from terd.errors import TerdError

__version__ = "0.1.0"
__all__ = ["TerdError", "__version__"]
