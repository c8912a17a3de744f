"""Why unclipped DDPM diverges on tiny-photos32 (bench_ddpm_stability.py): the network does not see the mean of
its input.

Near t = T, x_t is almost all noise, so the right noise prediction has the same per-channel mean (DC) as x_t:
d mean(eps_theta) / d mean(x_t) ~ 1. A network that answers ~0 leaves the DC of x_t in at every DDPM step,
where it is multiplied by 1/sqrt(alpha_t): over the whole chain by 1/sqrt(abar_T) ~ 160, which turns the
~0.03 DC of 32 x 32 noise into the flat colours of std ~5 that the sampler ends on.

Four measurements:
* ``ideal``: the gain the data asks for, if each image's per-channel mean a ~ N(mu, var_a) (var_a measured over
  the dataset) and the noise's mean ~ N(0, 1/(H*W)): Cov(e, x_t) / Var(x_t) of the means at step t. Digits
  have nearly one brightness (var_a 0.005), so the gain should be ~1 from t = 999 down to ~500; photos vary
  48x more, so it should fall from ~1 at t = 999 to ~0 by t = 500. A network meets the loss almost everywhere
  without it, which is why the DDPM loss hardly teaches it on photos.
* ``recorded``: the gain of the bench's models (photos32 and digits16 bases and BadDiffusion models).
* ``capacity``: is the gain learnable by this architecture at all? A fresh tiny-photos32 UNet (diffusers'
  default 32 norm groups = one channel per group, and 8 groups) trained 150 Adam steps on the DC alone, with
  inputs whose DC is large (0.3 std per image and channel).
* ``dc-weighted fine-tune``: the photos32 base fine-tuned 200 steps on the DDPM loss plus the squared error of
  the per-channel mean weighted 1023x (as heavy as all other pixels together), at the DC of real noise.
* ``offset-noise fine-tune``: the same 200 steps on the plain DDPM loss with offset noise (a per-image,
  per-channel constant of std 0.1 added to the noise; a known remedy for models that cannot shift an image's
  mean brightness). It changes the forward process the attacks' equations assume, so it is a probe here.

Needs the zoo caches runs/zoo-digits16 and runs/zoo-photos32. Run: .venv/bin/python benchmarks/bench_dc_gain.py

``--models DIR...`` instead measures the given models (gains, and the DDPM spread with ``--spread``) into
dc_gain_models.{json,md}, e.g. a tiny-photos32-dc base and its fine-tunes with and without the base's offset noise:
does a fine-tune keep the mean-reading that pretraining taught?
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from terd.data import load_dataset  # noqa: E402
from terd.errors import TerdError  # noqa: E402
from terd.models import load_denoiser  # noqa: E402
from terd.presets import get_preset  # noqa: E402
from terd.sampling import ddpm_sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ["runs/zoo-photos32/p32-benign-s0-e20", "runs/zoo-photos32/p32-bd-box-hat-e24",
            "runs/zoo-digits16/d16-benign-s0-e40", "runs/zoo-digits16/d16-bd-box-hat"]
TIMES = (999, 700, 500)


def eps_of(net: UNet2DModel):  # noqa: ANN201
    return lambda x, t: net(x, torch.full((x.shape[0],), t)).sample


@torch.no_grad()
def dc_gain(eps, shape: tuple[int, ...], t: int, shift: float = 0.05) -> float:  # noqa: ANN001
    """d mean(eps_theta) / d mean(x_t) for a small shift of zero-mean noise at step t (1 is right near T)."""
    x = torch.randn((16, *shape), generator=torch.Generator().manual_seed(1))
    x = x - x.mean(dim=(2, 3), keepdim=True)
    return round(float((eps(x + shift, t).mean() - eps(x, t).mean()) / shift), 3)


def gains(eps, shape: tuple[int, ...]) -> dict:  # noqa: ANN001
    return {f"gain@t{t}": dc_gain(eps, shape, t) for t in TIMES}


def ideal_gains(dataset: str) -> dict:
    """Cov(noise mean, x_t mean) / Var(x_t mean) under a Gaussian model of the images' per-channel means."""
    from terd.models.schedule import NoiseSchedule

    x = load_dataset(dataset).images
    var_a, var_e = float(x.mean(dim=(2, 3)).var(dim=0).mean()), 1 / (x.shape[2] * x.shape[3])
    abar = NoiseSchedule.linear().alphas_cumprod
    gain = {f"gain@t{t}": round(float((1 - abar[t]).sqrt() * var_e / (abar[t] * var_a + (1 - abar[t]) * var_e)), 3)
            for t in TIMES}
    return {"model": f"{dataset} data", "setting": "ideal", "training": f"var of the images' means {var_a:.4f}", **gain}


def capacity(groups: int, steps: int = 150) -> dict:
    torch.manual_seed(0)
    net = UNet2DModel(**{**get_preset("tiny-photos32").unet_config(), "norm_num_groups": groups})
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(8, 3, 32, 32) + 0.3 * torch.randn(8, 3, 1, 1)
        out = eps_of(net)(x, 999)
        loss = (out.mean(dim=(2, 3)) - x.mean(dim=(2, 3))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return {"model": f"fresh tiny-photos32 UNet, {groups} norm groups", "setting": "capacity",
            "training": f"{steps} Adam steps (lr 1e-3, batch 8) on the DC alone, input DC std 0.3", **gains(eps_of(net), (3, 32, 32))}


@torch.no_grad()
def ddpm_end_std(den) -> float:  # noqa: ANN001
    """Pixel std of 8 images from unclipped 1000-step DDPM (the data's is 0.60; the base ends at ~5.5)."""
    g = torch.Generator().manual_seed(0)
    return round(float(ddpm_sample(den, torch.randn((8, *den.image_shape), generator=g), generator=g).std()), 3)


def unchanged(path: str, setting: str) -> dict:
    """The fine-tunes' starting point: the model's gains and DDPM spread as built."""
    den = load_denoiser(ROOT / path)
    return {"model": Path(path).name, "setting": setting, "training": "before",
            **gains(den, den.image_shape), "ddpm_std_at_end": ddpm_end_std(den)}


def finetune(path: str, steps: int = 200, weight: float = 0.0, offset: float = 0.0) -> dict:
    """Fine-tune on the DDPM loss plus ``weight`` x the squared error of the per-channel mean; ``offset``: add
    offset noise (a per-image, per-channel constant ~ N(0, offset^2)) to the noise the network must predict."""
    den = load_denoiser(ROOT / path)
    net = den.network
    net.train().requires_grad_(True)
    abar = den.schedule.alphas_cumprod
    data = load_dataset("photos32").images
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (32,), generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        eps = torch.randn(data[idx].shape, generator=g)
        eps = eps + offset * torch.randn((*eps.shape[:2], 1, 1), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        err = net(a.sqrt() * data[idx] + (1 - a).sqrt() * eps, t).sample - eps
        loss = err.pow(2).mean() + weight * err.mean(dim=(2, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    after = {**gains(eps_of(net.eval()), den.image_shape), "ddpm_std_at_end": ddpm_end_std(den)}
    setting = "dc-weighted fine-tune" if weight else "offset-noise fine-tune"
    loss = f"DDPM loss + {weight:g} x DC error" if weight else f"DDPM loss, offset noise std {offset:g}"
    return {"model": Path(path).name, "setting": setting,
            "training": f"after {steps} steps (lr 2e-4, batch 32) of {loss}", **after}


def measure_models(paths: list[Path], spread: bool) -> None:
    """Gains (and DDPM spread) of given models, with what their train.json says of how they were trained."""
    from terd.train import training_record

    rows = []
    for path in paths:
        den = load_denoiser(path)
        rec = training_record(path)
        how = (f"{rec.get('epochs')} epochs x batch {rec.get('batch_size')}, offset noise {rec.get('offset_noise', 0.0)}"
               + (f", fine-tuned from {Path(rec['fine_tuned_from']).name}" if rec.get("fine_tuned_from") else ""))
        row = {"model": path.name, "setting": rec.get("preset", "?"), "training": how, **gains(eps_of(den.network), den.image_shape)}
        if spread:
            row["ddpm_std_at_end"] = ddpm_end_std(den)
        rows.append(row)
        print(row, flush=True)
    cols = ["model", "setting", "training"] + [f"gain@t{t}" for t in TIMES] + (["ddpm_std_at_end"] if spread else [])
    write_results("dc_gain_models", rows, cols, notes=(
        "Written by `benchmarks/bench_dc_gain.py --models ...` (one thread). gain@tT as in dc_gain.md (~1 is right "
        "near t = T; the photos32 data asks 0.99 / 0.40 / 0.05 at t = 999 / 700 / 500)."
        + (" ddpm_std_at_end: pixel std of 8 unclipped 1000-step DDPM samples (data: 0.60)." if spread else "")))


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", type=Path, help="measure these model directories instead")
    ap.add_argument("--spread", action="store_true", help="with --models: also the unclipped DDPM spread")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.models:
        if bad := [str(m) for m in args.models if not (m / "model_index.json").is_file()]:
            print(f"error: not a model directory: {', '.join(bad)}", file=sys.stderr)
            sys.exit(2)
        try:
            return measure_models(args.models, args.spread)
        except TerdError as exc:  # a broken model: one line, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
    rows = [ideal_gains(d) for d in ("photos32", "digits16")]
    for path in RECORDED:
        den = load_denoiser(ROOT / path)
        rows.append({"model": Path(path).name, "setting": "recorded", "training": "as built by the zoo",
                     **gains(den, den.image_shape)})
        print(rows[-1], flush=True)
    for groups in (32, 8):
        rows.append(capacity(groups))
        print(rows[-1], flush=True)
    rows.append(unchanged(RECORDED[0], "dc-weighted fine-tune"))  # both fine-tunes start from it
    for kind in ({"weight": 1023.0}, {"offset": 0.1}):
        rows.append(finetune(RECORDED[0], **kind))
        print(rows[-1], flush=True)
    cols = ["model", "setting", "training"] + [f"gain@t{t}" for t in TIMES] + ["ddpm_std_at_end"]
    write_results("dc_gain", rows, cols, notes=(
        "gain@tT: d mean(eps_theta) / d mean(x_t) at step T, for a 0.05 shift of 16 zero-mean noises (one thread). "
        "Near t = T the right value is ~1 (eps ~ x_t); at ~0 unclipped DDPM keeps the input's DC and multiplies it "
        "by ~1/sqrt(abar_T) ~ 160 over the chain. ddpm_std_at_end: pixel std of 8 images from unclipped 1000-step "
        "DDPM (BadDiffusion's sampler) with the fine-tuned network (photos32 data: 0.60)."))


if __name__ == "__main__":
    main()
