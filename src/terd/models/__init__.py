"""Model loading and the one wrapper every other module talks to."""

from terd.models.denoiser import Denoiser
from terd.models.loading import load_denoiser, save_pipeline
from terd.models.schedule import NoiseSchedule

__all__ = ["Denoiser", "NoiseSchedule", "load_denoiser", "save_pipeline"]
