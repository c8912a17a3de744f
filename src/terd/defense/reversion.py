"""Trigger reversion: find (r, gamma) such that x_T = gamma * eps + r is what the model treats as noise.

Two stages (terd-method.md section 3), both minimising ``L - lambda * ||r||_1`` (the MINUS keeps r
from collapsing to the trivial benign solution r = 0):

1. estimation: surrogate x_0 ~ N(0, I), the "ending" term only (t in the last 10 steps);
2. refinement: x_0 = the model's own 10-step DDIM generation from the current trigger, gradient
   kept through the sampler, ending + beginning terms, clipped gradients.

Design choices that differ from the reference code, and why:

* gamma is learned as gamma = exp(s), s = 0 at the start (the benign value 1), with its own
  learning rate. The reference starts from gamma = 0 with lr 1e-3, which needs thousands of steps
  to come back to 1 on a benign model (~0.32 after 350) and inflates benign KL features through
  -log gamma. ``GammaMode.REFERENCE`` keeps the reference behaviour for comparison.
* The model is frozen (no weight gradients) and every network evaluation is counted.
* The optimiser is plain SGD written out (lr from a closed-form cosine), and every random draw of
  iteration i comes from a generator seeded by (seed, stage, i): a checkpoint holds only tensors and
  counters, and a resumed run is bit-identical to an uninterrupted one.
* ``fast`` uses K noises per x_0 (K(K-1)/2 loss pairs per K evaluations) and fewer iterations. It also
  checks every 25 iterations whether the trigger stopped moving (a scan's report.json lists each check as
  ``trigger_movement``: [stage, iteration, RMS change]), but on the demo models that check never stops a stage:
  it stays above the tolerance in every window (closest in stage 1's last one, where the cosine schedule slows it
  anyway), so fast's evaluations equal ``network_evaluations_bound``.
* Learned gamma is a multi-start inside one run: candidates start at gamma = 1 (the benign value; BadDiffusion
  and VillanDiffusion triggers have gamma = 1) and near gamma = 0.5 (a TrojDiff-style trigger is only "seen" by
  the model once the noise is shrunk). All candidates share every random draw. No candidate is "selected" by its
  loss: on small models the TrojDiff trigger and the benign solution reach similar losses, and picking by loss
  flipped with the CPU thread count (measured). The decision statistic is each KL feature's maximum over the
  candidates; the reported trigger is the candidate farthest from benign noise (largest mean KL).
* ``fast`` starts its low-gamma candidate with a gradient line search (``_line_search_start``) and learns gamma
  with Adam: from the reference start r = -U[0,1) no optimiser reached the TrojDiff valley on tiny models, and
  plain SGD on gamma left benign models at gamma ~0.66 (false positives); both measured on tiny-digits16.
  The search also tries the end of a 40-step Adam descent on r at the candidate's start gamma: on a
  tiny-photos32-dc TrojDiff blend model the gradient at r = 0 pointed away from the trigger and only descent
  reached it (``_fixed_gamma_descent``; benchmarks/bench_descent_start.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from terd.defense.loss import BEGINNING, ENDING, reversed_losses, term_timesteps
from terd.defense.model_detection import candidate_features, kl_features, localization
from terd.defense.patch_probe import first_look_found_patch, probe_patch
from terd.defense.trigger import Trigger
from terd.errors import TerdError
from terd.models.denoiser import Denoiser
from terd.models.safe_io import load_tensors
from terd.sampling import ddim_sample

GAMMA_LEARNED = "learned"  # gamma = exp(s), s0 = 0, own lr (default)
GAMMA_FIXED = "fixed"  # gamma = 1 (BadDiffusion/VillanDiffusion-style reversion)
GAMMA_REFERENCE = "reference"  # gamma linear, init 0, SGD lr 1e-3, clamp >= 0 (PKU-ML/TERD TrojDiff script)
GAMMA_MODES = (GAMMA_LEARNED, GAMMA_FIXED, GAMMA_REFERENCE)
START_REFERENCE, START_LINE_SEARCH = "reference", "line-search"
CHECKPOINT_NAME = "reversion-checkpoint.safetensors"
DEFAULT_GAMMA_INITS = (1.0, 0.5)

Progress = Callable[[int, int, int, float], None]  # (stage, iteration done, stage total, loss)


@dataclass(frozen=True)
class ReversionConfig:
    """Every knob of a reversion run. ``None`` for ``l1``/``clip`` means "the reference rule for this image size"."""

    name: str = "custom"
    stage1_iters: int = 3000
    stage2_iters: int = 1000
    batch_size: int = 16  # x_0 per iteration (stage 1: surrogate draws; stage 2: generated images)
    noises_per_x0: int = 2  # K; 2 = the paper's two-noise loss
    lr: float = 0.5
    optimizer: str = "sgd"  # for r: "sgd" (the reference) or "adam" (per-pixel step sizes; lr is Adam's)
    gamma_optimizer: str = "sgd"  # the same choice for the gamma parameter (gamma_lr is its lr)
    gamma_mode: str = GAMMA_LEARNED
    gamma_lr: float = 0.05  # on s = log gamma (learned) or gamma itself (reference uses 1e-3)
    gamma_init: float | tuple[float, ...] | None = None  # None: (1, 0.5) learned, 0 reference; unused when fixed
    l1: float | None = None  # 5e-5 at <= 32 px, 5e-4 above
    clip: float | None = None  # stage-2 grad-norm clip of r: 0.01 at <= 32 px, 0.2 above
    clip_scale: float = 1.0  # multiplies the size rule (fewer stage-2 steps need bigger steps)
    ddim_steps: int = 10
    starts: tuple[str, ...] = ()  # per candidate: "reference" (r = -U[0,1) at its start gamma, the default) or
    #                               "line-search" (see _line_search_start)
    search_gammas: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # line-search: gammas tried
    search_radii: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5)  # line-search: |r| tried, in units of sqrt(C*H*W)
    descent_iters: int = 0  # line-search: also try r from this many Adam steps at the candidate's fixed start gamma
    descent_lr: float = 0.02
    early_stop_tol: float | None = None  # stop a stage when RMS change of (r, gamma) over a window is below
    early_stop_window: int = 25
    min_iters: int = 0  # never stop a stage before this many iterations
    checkpoint_every: int = 50
    patch_probe: bool = True  # also look for a small patch trigger (patch_probe.py): an input-detection candidate
    patch_search: bool = True  # ... and when its first look finds no window, search for one (a larger patch)
    patch_min_side: int = 2  # ... a window is a patch only when it spans at least this many pixels each way
    patch_search_starts: int = 3  # ... the search climbs from this many of the best coarse squares

    def resolved_l1(self, image_shape) -> float:  # noqa: ANN001
        return self.l1 if self.l1 is not None else (5e-5 if max(image_shape[1:]) <= 32 else 5e-4)

    def resolved_clip(self, image_shape) -> float:  # noqa: ANN001
        base = self.clip if self.clip is not None else (0.01 if max(image_shape[1:]) <= 32 else 0.2)
        return base * self.clip_scale

    def gamma_inits(self) -> tuple[float, ...]:
        """Starting gamma of each candidate (one candidate unless gamma is learned)."""
        if self.gamma_mode == GAMMA_FIXED:
            return (1.0,)
        if self.gamma_mode == GAMMA_REFERENCE:
            return (float(self.gamma_init) if self.gamma_init is not None else 0.0,)
        if self.gamma_init is None:
            return DEFAULT_GAMMA_INITS
        return tuple(float(v) for v in self.gamma_init) if isinstance(self.gamma_init, (tuple, list)) \
            else (float(self.gamma_init),)

    def searched_gammas(self) -> dict[int, list[float]]:
        """Line-search candidates -> the grid gammas each searches: those nearest its start gamma (ties: larger)."""
        inits = self.gamma_inits()
        grid = (1.0,) if self.gamma_mode == GAMMA_FIXED else self.search_gammas
        out = {i: [] for i, how in enumerate(self.starts[:len(inits)]) if how == START_LINE_SEARCH}
        for gv in grid:
            nearest = min(range(len(inits)), key=lambda j: (abs(gv - inits[j]), -inits[j]))
            if nearest in out:
                out[nearest].append(gv)
        return {i: v or [inits[i]] for i, v in out.items()}  # a start with no grid gamma nearby searches its own

    def network_evaluations_bound(self) -> int:
        """Images pushed through the network (each with a backward pass) if no stage stops early."""
        per1 = self.noises_per_x0 * self.batch_size
        per2 = self.ddim_steps * self.batch_size + 2 * self.noises_per_x0 * self.batch_size
        m = len(self.gamma_inits())
        searched = self.searched_gammas()
        gammas = sum(len(v) for v in searched.values())
        k = max(self.noises_per_x0, 2)
        search = gammas * (1 + 2 * len(self.search_radii)) * k * self.batch_size
        descents = len(searched) * (self.descent_iters * k * self.batch_size + k * self.batch_size
                                                  if self.descent_iters else 0)
        return m * (self.stage1_iters * per1 + self.stage2_iters * per2) + search + descents


PRESETS: dict[str, ReversionConfig] = {
    # The reference schedule exactly: 3000 + 1000 SGD steps of batch 16, two noises, lr 0.5, 10-step DDIM.
    "paper": ReversionConfig(name="paper"),
    # Same objective with ~27x fewer network evaluations (bound 23,584 vs 640,000 for two candidates): 4 noises
    # per x_0 (6 loss pairs per 4 evaluations), 150 + 40 iterations (an early-stop check that
    # does not fire on the measured models), a stage-2 clip scaled by 1000/40
    # so the largest possible total trigger movement in stage 2 equals the paper schedule's, a line-search start
    # for the low-gamma candidate (with a 40-step fixed-gamma descent as one more point it may start from) and Adam
    # on gamma (see the module docstring for why).
    "fast": ReversionConfig(name="fast", stage1_iters=150, stage2_iters=40, batch_size=8, noises_per_x0=4,
                            clip_scale=25.0, early_stop_tol=2e-3, early_stop_window=25, min_iters=50,
                            checkpoint_every=10, starts=(START_REFERENCE, START_LINE_SEARCH),
                            gamma_optimizer="adam", gamma_lr=0.01, descent_iters=40),
}


def get_config(preset: str, **overrides) -> ReversionConfig:
    if preset not in PRESETS:
        raise TerdError(f"unknown preset {preset!r} (available: {', '.join(PRESETS)})")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("gamma_mode") == GAMMA_REFERENCE and "gamma_lr" not in given:
        given["gamma_lr"] = 1e-3  # the reference's SGD lr on gamma itself
    cfg = replace(PRESETS[preset], **given)
    if cfg.gamma_mode not in GAMMA_MODES:
        raise TerdError(f"unknown gamma mode {cfg.gamma_mode!r} (available: {', '.join(GAMMA_MODES)})")
    return cfg


@dataclass
class ReversionResult:
    """``trigger``: the candidate farthest from benign noise (largest mean KL); ``features``: the decision statistic,
    each KL feature's maximum over all candidates, so a model is flagged when ANY candidate is anomalous."""

    trigger: Trigger
    network_evaluations: int  # images through the network (forward + backward)
    network_calls: int  # batched forward calls
    seconds: float
    iterations: dict  # {"stage1": n, "stage2": n}
    stopped_early: dict
    history: dict  # per-stage loss traces
    config: dict
    resumed_from: dict | None = None
    candidates: list = field(default_factory=list)  # per candidate: gamma start, start rule, features, reported
    candidate_triggers: list = field(default_factory=list)
    features: dict = field(default_factory=dict)
    patch_probe: dict | None = None  # what the patch probe saw, and its candidate's index in input_candidates
    patch_candidate: Trigger | None = None
    probe_evaluations: int = 0  # the probe's forward-only images (not in network_evaluations)

    @property
    def input_candidates(self) -> list[Trigger]:
        """The candidates input detection uses: the reversion's, then the patch probe's (if it found a patch)."""
        return self.candidate_triggers + ([self.patch_candidate] if self.patch_candidate is not None else [])


class CountingDenoiser:
    """Duck-typed Denoiser that counts evaluations (images) and calls, for honest cost reports."""

    def __init__(self, den: Denoiser, evaluations: int = 0, calls: int = 0) -> None:
        self.den, self.evaluations, self.calls = den, evaluations, calls
        self.schedule, self.num_timesteps, self.image_shape = den.schedule, den.num_timesteps, den.image_shape
        self.device = den.device

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:  # noqa: ANN001
        self.evaluations += x.shape[0]
        self.calls += 1
        return self.den(x, t)


def _generator(seed: int, stage: int, iteration: int) -> torch.Generator:
    """Per-iteration RNG: resuming at iteration i replays exactly the draws of an uninterrupted run."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + stage) * 1_000_003 + iteration) % (2**63 - 1))


def _cosine(lr: float, it: int, total: int) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * it / max(total, 1)))


@dataclass
class _State:
    r: torch.Tensor
    s: torch.Tensor  # gamma parameter: log gamma (learned), gamma (reference), zeros (fixed)
    stage: int = 1
    it: int = 0
    evaluations: int = 0
    calls: int = 0
    seconds: float = 0.0
    r_snap: torch.Tensor | None = None
    s_snap: torch.Tensor | None = None
    moments: dict = field(default_factory=dict)  # Adam first/second moments of r and s (reset per stage)
    iterations: dict = field(default_factory=lambda: {"stage1": 0, "stage2": 0})
    stopped_early: dict = field(default_factory=lambda: {"stage1": False, "stage2": False})
    history: dict = field(default_factory=lambda: {"stage1": [], "stage2": [], "movement": [], "per_candidate": []})

    def gamma(self, mode: str) -> torch.Tensor:
        return _gamma_of(self.s, mode)


def _gamma_of(s: torch.Tensor, mode: str) -> torch.Tensor:
    """gamma from its parameter: exp(s) (learned), s itself (reference), or 1 (fixed)."""
    if mode == GAMMA_LEARNED:
        return s.exp()
    if mode == GAMMA_REFERENCE:
        return s
    return torch.ones_like(s)


def _fingerprint(cfg: ReversionConfig, seed: int, den: Denoiser) -> str:
    return json.dumps({"config": asdict(cfg), "seed": seed, "shape": list(den.image_shape),
                       "params": den.num_parameters() if hasattr(den, "num_parameters") else None}, sort_keys=True)


def _save_checkpoint(path: Path, st: _State, fingerprint: str) -> None:
    tensors = {"r": st.r, "s": st.s, "r_snap": st.r_snap, "s_snap": st.s_snap,
               **{f"moment_{k}": v for k, v in st.moments.items()}}
    meta = {"fingerprint": fingerprint, "state": json.dumps({
        "stage": st.stage, "it": st.it, "evaluations": st.evaluations, "calls": st.calls, "seconds": st.seconds,
        "iterations": st.iterations, "stopped_early": st.stopped_early, "history": st.history})}
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(path)  # atomic: an interrupt never leaves a half-written checkpoint


def _load_checkpoint(path: Path, fingerprint: str) -> _State:
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("fingerprint") != fingerprint:
        raise TerdError(f"{path}: checkpoint was made with different settings (preset, seed or model); "
                        "run without --resume to start over")
    info = json.loads(meta["state"])
    moments = {k.removeprefix("moment_"): v for k, v in tensors.items() if k.startswith("moment_")}
    return _State(r=tensors["r"], s=tensors["s"], r_snap=tensors["r_snap"], s_snap=tensors["s_snap"], moments=moments,
                  stage=info["stage"], it=info["it"], evaluations=info["evaluations"], calls=info["calls"],
                  seconds=info["seconds"], iterations=info["iterations"], stopped_early=info["stopped_early"],
                  history=info["history"])


def _initial_state(shape, cfg: ReversionConfig, seed: int, device) -> _State:  # noqa: ANN001
    inits = cfg.gamma_inits()
    r = -torch.rand(shape, generator=_generator(seed, 0, 0)).to(device).expand(len(inits), *shape).clone()
    if cfg.gamma_mode == GAMMA_LEARNED:  # s = log gamma, one row per candidate
        s = torch.stack([torch.full(shape, math.log(g), device=device) for g in inits])
    elif cfg.gamma_mode == GAMMA_REFERENCE:
        s = torch.full((1, *shape), inits[0], device=device)
    else:
        s = torch.zeros((1, *shape), device=device)  # unused: gamma = 1
    return _State(r=r, s=s, r_snap=r.clone(), s_snap=s.clone())


def _line_search_start(
    counted: CountingDenoiser, cfg: ReversionConfig, seed: int, lam: float
) -> dict[int, tuple[torch.Tensor, torch.Tensor, dict]]:
    """Start each line-search candidate where a cheap search along the loss gradient finds the lowest objective.

    Why: on small models a TrojDiff trigger sits in a narrow valley behind a barrier. At r = 0 the gradient of the
    ending loss points at the trigger (cosine ~0.8 with the true mu on tiny-digits TrojDiff models, measured), but
    descending it moves AWAY (the barrier), and from the reference start r = -U[0,1) no local optimiser reached the
    valley. So for each gamma the candidate searches (``ReversionConfig.searched_gammas``) take
    u = grad_r L(0, gamma) / ||grad_r L||, evaluate the objective at r = 0 and r = +-c sqrt(d) u for c in
    ``search_radii`` on one shared batch, and start at the best point. On a benign model no point beats r = 0 by
    much and learned gamma returns towards 1 afterwards. With ``descent_iters`` the end of a short fixed-gamma
    descent (``_fixed_gamma_descent``) is one more point. Returns {candidate: (r, s, info)}; info's ``rule`` says
    which kind of point won ("line" or "descent").
    """
    shape, dev = counted.image_shape, counted.den.device
    g = _generator(seed, 0, 1)
    b, k = cfg.batch_size, max(cfg.noises_per_x0, 2)
    x0 = torch.randn((b, *shape), generator=g).to(dev)
    t = term_timesteps(ENDING, counted.num_timesteps, b, g)
    eps = torch.randn((k, b, *shape), generator=g).to(dev)
    d = math.prod(shape)

    def objectives(r: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:  # (M, C, H, W) points -> (M,)
        return reversed_losses(counted, r, gamma, x0, t, 1.0, eps) - lam * r.flatten(1).abs().sum(1)

    starts = {}
    for i, gammas in cfg.searched_gammas().items():
        points = []  # (objective, gamma, r)
        for gv in gammas:
            gamma = torch.full((1, *shape), float(gv), device=dev)
            r0 = torch.zeros((1, *shape), device=dev, requires_grad=True)
            with torch.enable_grad():
                obj0 = objectives(r0, gamma)
                (grad,) = torch.autograd.grad(obj0.sum(), r0)
            points.append((float(obj0.detach()), gv, r0.detach()[0]))
            if not cfg.search_radii:
                continue
            u = grad[0] / (grad.norm() + 1e-12)
            rs = torch.stack([sign * c * math.sqrt(d) * u for c in cfg.search_radii for sign in (1.0, -1.0)])
            with torch.no_grad():  # all radii of this gamma in one network call
                objs = objectives(rs, gamma.expand_as(rs))
            points.extend((float(o), gv, r) for o, r in zip(objs, rs, strict=True))
        obj, gv, r = min(points, key=lambda p: p[0])
        info = {"rule": "line", "line_objective": round(obj, 6)}
        if cfg.descent_iters:
            gv_d = cfg.gamma_inits()[i]
            r_d = _fixed_gamma_descent(counted, cfg, seed, i, gv_d, lam)
            with torch.no_grad():  # judged on the shared batch, like every line point
                obj_d = float(objectives(r_d[None], torch.full((1, *shape), gv_d, device=dev)))
            info["descent_objective"] = round(obj_d, 6)
            if obj_d < obj:
                obj, gv, r, info["rule"] = obj_d, gv_d, r_d, "descent"
        gamma0 = torch.full(shape, float(gv), device=dev)
        s = (gamma0.log() if cfg.gamma_mode == GAMMA_LEARNED else
             gamma0 if cfg.gamma_mode == GAMMA_REFERENCE else torch.zeros(shape, device=dev))
        starts[i] = (r, s, {"candidate": i, "gamma": gv, "r_l2": round(float(r.norm()), 4), "objective": round(obj, 6),
                            **info})
    return starts


def _fixed_gamma_descent(counted: CountingDenoiser, cfg: ReversionConfig, seed: int, i: int, gamma_value: float,
                         lam: float) -> torch.Tensor:
    """``cfg.descent_iters`` Adam steps on r alone (stage-1 objective, gamma held at ``gamma_value``) from r = 0.

    Why: the gradient at r = 0 does not always point at the trigger. On a tiny-photos32-dc TrojDiff blend model
    it pointed away from the true mu (an unrecorded look), so no line point came near the valley and the
    candidate ended benign-like; plain descent at gamma 0.5 from r = 0 walked into it (benchmarks/
    bench_descent_start.py). On the tiny-digits models it is the other way round (the line search finds the valley,
    descent walks away from the barrier), so both are tried and the lower objective on the shared batch wins. Its
    draws come from their own generator, so when a line point wins the run is bit-identical to one without descent.
    """
    shape, dev = counted.image_shape, counted.den.device
    g = _generator(seed, 0, 2 + i)
    b, k = cfg.batch_size, max(cfg.noises_per_x0, 2)
    gamma = torch.full((1, *shape), float(gamma_value), device=dev)
    r = torch.zeros((1, *shape), device=dev, requires_grad=True)
    opt = torch.optim.Adam([r], lr=cfg.descent_lr, betas=ADAM_BETAS)
    for _ in range(cfg.descent_iters):
        x0 = torch.randn((b, *shape), generator=g).to(dev)
        t = term_timesteps(ENDING, counted.num_timesteps, b, g)
        eps = torch.randn((k, b, *shape), generator=g).to(dev)
        with torch.enable_grad():
            obj = reversed_losses(counted, r, gamma, x0, t, 1.0, eps).sum() - lam * r.abs().sum()
            opt.zero_grad()
            obj.backward()
        opt.step()
    return r.detach()[0]


def _iteration_loss(
    counted: CountingDenoiser, st: _State, cfg: ReversionConfig, r: torch.Tensor, s: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """Per-candidate stochastic estimates (shape (M,)) of the stage's reversed loss (without the L1 term).

    All candidates see the same draws (common random numbers), so their losses compare fairly.
    """
    shape = counted.image_shape
    b, k, T = cfg.batch_size, cfg.noises_per_x0, counted.num_timesteps
    gamma = _gamma_of(s, cfg.gamma_mode)
    dev = r.device
    if st.stage == 1:
        x0 = torch.randn((b, *shape), generator=g).to(dev)  # surrogate x_0 from the prior
        t = term_timesteps(ENDING, T, b, g)
        eps = torch.randn((k, b, *shape), generator=g).to(dev)
        return reversed_losses(counted, r, gamma, x0, t, 1.0, eps)
    eps_T = torch.randn((b, *shape), generator=g).to(dev)
    draws = []
    for term in (ENDING, BEGINNING):
        draws.append((term_timesteps(term, T, b, g), torch.randn((k, b, *shape), generator=g).to(dev)))
    m = r.shape[0]
    x_T = gamma.unsqueeze(1) * eps_T + r.unsqueeze(1)  # (M, B, C, H, W): every candidate's images in one batch
    x0 = ddim_sample(counted, x_T.reshape(m * b, *shape), steps=cfg.ddim_steps).view_as(x_T)  # gradient kept
    ending, beginning = (reversed_losses(counted, r, gamma, x0, t, c, eps) for (t, eps), c in zip(draws, (1.0, 0.0),
                                                                                                    strict=True))
    return 0.5 * (ending + beginning)


ADAM_BETAS = (0.9, 0.999)


def _direction(st: _State, name: str, grad: torch.Tensor, optimizer: str) -> torch.Tensor:
    """The step direction for one parameter: the gradient (SGD) or Adam's bias-corrected normalised moment.

    Why Adam for ``fast``: the loss is a sum over pixels, so each pixel's gradient is ~1/d of the loss change and
    plain SGD at a few hundred steps leaves r and gamma next to their initial values on small models (measured).
    """
    if optimizer == "sgd":
        return grad
    if optimizer != "adam":
        raise TerdError(f"unknown optimizer {optimizer!r} (available: sgd, adam)")
    b1, b2 = ADAM_BETAS
    m = st.moments.get(f"{name}_m", torch.zeros_like(grad)).mul(b1).add(grad, alpha=1 - b1)
    v = st.moments.get(f"{name}_v", torch.zeros_like(grad)).mul(b2).addcmul(grad, grad, value=1 - b2)
    st.moments[f"{name}_m"], st.moments[f"{name}_v"] = m, v
    n = st.it + 1
    return (m / (1 - b1**n)) / ((v / (1 - b2**n)).sqrt() + 1e-8)


def _clip_(grad: torch.Tensor, max_norm: float | None) -> None:
    """Clip each candidate's gradient (first dim) to an l2 norm of at most ``max_norm``, in place."""
    if max_norm is not None:
        norm = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
        grad.mul_(torch.where(norm > max_norm, max_norm / (norm + 1e-12), torch.ones_like(norm)))


def reverse_trigger(
    den: Denoiser,
    config: ReversionConfig | str = "fast",
    *,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> ReversionResult:
    """Run both reversion stages on a frozen model and return the reversed trigger with its cost.

    ``checkpoint``: a file written every ``config.checkpoint_every`` iterations (and at stage ends);
    with ``resume`` an existing checkpoint is continued and the result equals an uninterrupted run.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    den.freeze()
    device = den.device
    shape = den.image_shape
    fp = _fingerprint(cfg, seed, den)
    ckpt = Path(checkpoint) if checkpoint is not None else None
    resumed = None
    if resume and ckpt is not None and ckpt.is_file():
        st = _load_checkpoint(ckpt, fp)
        st.r, st.s, st.r_snap, st.s_snap = (v.to(device) for v in (st.r, st.s, st.r_snap, st.s_snap))
        st.moments = {k: v.to(device) for k, v in st.moments.items()}
        resumed = {"stage": st.stage, "iteration": st.it}
    else:
        st = _initial_state(shape, cfg, seed, device)
    lam = cfg.resolved_l1(shape)
    counted = CountingDenoiser(den, st.evaluations, st.calls)
    if resumed is None and START_LINE_SEARCH in cfg.starts:
        starts = _line_search_start(counted, cfg, seed, lam)
        for i, (r0, s0, _) in starts.items():
            st.r[i], st.s[i] = r0, s0
        st.history["start"] = [info for _, _, info in starts.values()]
        st.r_snap, st.s_snap = st.r.clone(), st.s.clone()
        st.evaluations, st.calls = counted.evaluations, counted.calls
    clip2 = cfg.resolved_clip(shape)
    totals = {1: cfg.stage1_iters, 2: cfg.stage2_iters}
    d = st.r[0].numel()
    start = time.perf_counter() - st.seconds

    def sync_and_save() -> None:
        st.evaluations, st.calls, st.seconds = counted.evaluations, counted.calls, time.perf_counter() - start
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_checkpoint(ckpt, st, fp)

    while st.stage <= 2:
        total = totals[st.stage]
        key = f"stage{st.stage}"
        while st.it < total:
            g = _generator(seed, st.stage, st.it + 1)
            r = st.r.detach().requires_grad_(True)
            s = st.s.detach().requires_grad_(cfg.gamma_mode != GAMMA_FIXED)
            with torch.enable_grad():
                fit = _iteration_loss(counted, st, cfg, r, s, g)
                objective = (fit - lam * r.flatten(1).abs().sum(1)).sum()  # MINUS: the L1 term keeps r off zero
                grads = torch.autograd.grad(objective, [r, s] if s.requires_grad else [r])
            gr = grads[0]
            gs = grads[1] if len(grads) > 1 else None
            if st.stage == 2:
                _clip_(gr, clip2)
            if gs is not None:
                _clip_(gs, math.sqrt(d))  # safety net: RMS gamma-gradient <= 1, so one step moves s by <= gamma_lr
            lr = _cosine(cfg.lr, st.it, total)
            with torch.no_grad():
                st.r = st.r - lr * _direction(st, "r", gr, cfg.optimizer)
                if gs is not None:
                    st.s = st.s - _cosine(cfg.gamma_lr, st.it, total) * _direction(st, "s", gs, cfg.gamma_optimizer)
                    if cfg.gamma_mode == GAMMA_REFERENCE:
                        st.s = st.s.clamp(min=0.0)
                    elif cfg.gamma_mode == GAMMA_LEARNED:
                        st.s = st.s.clamp(-12.0, 5.0)
            st.it += 1
            st.iterations[key] = st.it
            chosen_fit = float(fit.detach().min())
            st.history[key].append(round(chosen_fit, 6))
            st.history["per_candidate"].append([st.stage, *[round(float(v), 6) for v in fit.detach()]])
            stop = False
            if cfg.early_stop_tol is not None and st.it % cfg.early_stop_window == 0:
                gam, gam_snap = st.gamma(cfg.gamma_mode), _gamma_of(st.s_snap, cfg.gamma_mode)
                move = math.sqrt(float(((st.r - st.r_snap).pow(2) + (gam - gam_snap).pow(2)).flatten(1).sum(1).max())
                                 / d)  # the slowest candidate decides
                stop = st.it >= cfg.min_iters and move < cfg.early_stop_tol
                st.history["movement"].append([st.stage, st.it, round(move, 6)])
                st.r_snap, st.s_snap = st.r.clone(), st.s.clone()
            if stop:
                st.stopped_early[key] = True
                break
            if ckpt is not None and st.it % cfg.checkpoint_every == 0:
                sync_and_save()
            if progress is not None:
                progress(st.stage, st.it, total, chosen_fit)
        st.stage, st.it = st.stage + 1, 0
        st.r_snap, st.s_snap = st.r.clone(), st.s.clone()
        st.moments = {}  # a new optimiser per stage, as in the reference
        sync_and_save()
    st.evaluations, st.calls = counted.evaluations, counted.calls
    meta = {"preset": cfg.name, "seed": seed, "gamma_mode": cfg.gamma_mode, "source": den.source}
    gam = st.gamma(cfg.gamma_mode).clamp(min=0.0)
    triggers = [Trigger(st.r[i], gam[i], meta={**meta, "gamma_init": g0, "start": _start_of(cfg, i)})
                for i, g0 in enumerate(cfg.gamma_inits())]
    feats = [kl_features(tr) for tr in triggers]
    best = max(range(len(triggers)), key=lambda i: feats[i]["M_r"])
    candidates = [{"gamma_init": tr.meta["gamma_init"], "start": tr.meta["start"], "reported": i == best,
                   "gamma_mean": float(tr.gamma.mean()), "r_l2": float(tr.r.norm()), **feats[i]}
                  for i, tr in enumerate(triggers)]
    probe, probed = None, CountingDenoiser(den)
    if cfg.patch_probe:
        probe = probe_patch(probed, seed=seed, search=cfg.patch_search, min_side=cfg.patch_min_side,
                            search_starts=cfg.patch_search_starts)
    probe_seen = None if probe is None else {**probe.summary(),
                                             "candidate_index": len(triggers) if probe.candidate else None}
    return ReversionResult(trigger=triggers[best], network_evaluations=st.evaluations, network_calls=st.calls,
                           seconds=round(st.seconds, 3), iterations=dict(st.iterations),
                           stopped_early=dict(st.stopped_early), history=st.history, config=asdict(cfg),
                           resumed_from=resumed, candidates=candidates, candidate_triggers=triggers,
                           features={**candidate_features(feats), **probe_features(probe_seen)},
                           patch_probe=probe_seen,
                           patch_candidate=probe.candidate if probe is not None else None,
                           probe_evaluations=probed.evaluations)


def probe_features(probe_summary: dict | None) -> dict[str, float]:
    """The model-level features a patch probe's summary gives: L_p when it ran and saw a response (from the recorded,
    rounded support, so a report's L_p and one recomputed from it agree), W_p when it read a window's value."""
    if not probe_summary or "elements" not in probe_summary:
        return {}
    out = {}
    if (value := localization(probe_summary.get("leading_support"), probe_summary["elements"],
                              first_look_found_patch(probe_summary))) is not None:
        out["L_p"] = value
    if probe_summary.get("explained_offset") is not None:
        out["W_p"] = float(probe_summary["explained_offset"])
    return out


def _start_of(cfg: ReversionConfig, i: int) -> str:
    return cfg.starts[i] if i < len(cfg.starts) else START_REFERENCE
