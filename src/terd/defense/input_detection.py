"""Input detection: is this initial noise x_T drawn from the backdoor N(r, gamma^2) or from N(0, I)?

Score = log-likelihood ratio  LLR(x) = log N(x; r, diag(gamma^2)) - log N(x; 0, I)
        = sum_i [ -log gamma_i - (x_i - r_i)^2 / (2 gamma_i^2) + x_i^2 / 2 ]
over a batch, never with a d x d matrix: one fused pass over the inputs for ordinary gamma (a compiled
kernel on CPU, two matrix-vector products in torch elsewhere), the direct float64 form for tiny gamma
(where expanding the square would cancel catastrophically). Positive = backdoor input.

Thresholds: 0 is the paper's rule (pick the likelier hypothesis). Because benign noise is exactly
N(0, I), the LLR of benign inputs has a known law, so a threshold with a chosen false-positive rate
needs no data. Per dimension the LLR is a quadratic a_i z^2 + b_i z + c_i of a standard normal z, so
the sum is a generalised chi-square. Its tail is computed with Imhof's (1961) inversion of the
characteristic function (numerical quadrature, accurate to ~1e-9 absolute here) — written in a form
that stays stable as a_i -> 0 (gamma_i -> 1), where the term becomes Gaussian. When every gamma_i = 1
exactly the law is Gaussian, N(-||r||^2/2, ||r||^2), and the closed form is used; when every gamma_i != 1
is the same value (a patch, like the patch probe's candidate) it is a scaled non-central chi-square,
also closed form (Imhof needs ~10 s for a 2x2 patch at gamma 0.1, where its integrand oscillates fast).
The tests check the tail against Monte Carlo. The same machinery gives the expected detection rate under the backdoor law.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import integrate, optimize, special, stats

from terd.defense import llr_kernel
from terd.defense.trigger import GAMMA_FLOOR, IMPLICATED, Trigger, candidates_from_tensors
from terd.errors import TerdError
from terd.rates import DEFAULT_FPR

EXPANDED_MIN_GAMMA = 0.05  # below this the expanded quadratic loses digits to cancellation


CHUNK_BYTES = 3 << 20  # rows per LLR chunk: ~3 MB (measured best of 1-4 MB: 64 px ~2.0x, 256 px ~2.2x a matvec)


def _chunked_quadratic(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(x*x) @ a + x @ b in torch (CUDA and other non-CPU inputs), row chunk by row chunk so each input is
    read from memory once.

    The squares go to one reused buffer and both products write into the result in place: a fresh
    temporary per chunk costs page faults, and with them the learned-gamma LLR ran at 3.6x a matvec.
    """
    rows = max(1, CHUNK_BYTES // (x.element_size() * x.shape[1]))
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    squares = torch.empty(min(rows, x.shape[0]), x.shape[1], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows):
        part = x[start:start + rows]
        buf, res = squares[:part.shape[0]], out[start:start + rows]
        torch.mul(part, part, out=buf)
        torch.mv(buf, a, out=res)
        torch.addmv(res, part, b, out=res)
    return out


def _expanded_form(r: torch.Tensor, g: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(a, b, c) with LLR = a.x^2 + b.x + c in ``dtype``; None when some gamma is too small to expand safely.
    ``r`` and ``g`` are flat float64 (g already floored)."""
    if float(g.min()) < EXPANDED_MIN_GAMMA:
        return None
    inv = 1.0 / g.square()
    a, b = (0.5 * (1.0 - inv)).to(dtype), (r * inv).to(dtype)
    return a, b, float(-g.log().sum() - (0.5 * r.square() * inv).sum())


def _flat_law(x: torch.Tensor, r: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = r.double().flatten().to(x.device)
    if x.shape[1] != r.numel():
        raise TerdError(f"inputs have {x.shape[1]} values each, the trigger {r.numel()}")
    return r, gamma.double().flatten().clamp(min=GAMMA_FLOOR).to(x.device)


def _work(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _direct_llr(x: torch.Tensor, r: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (-(x - r).square() / (2 * g.square()) + x.square() / 2).sum(dim=1) - g.log().sum()


def _quadratic(work: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(x*x) @ a_k + x @ b_k for K forms (a, b: K x d), N x K float64, each input read once where possible:
    gamma == 1 is one matrix product, CPU the fused kernel, elsewhere row-chunked torch per form."""
    if not bool((a != 0).any()):  # every gamma == 1: the quadratic term vanishes
        return (work @ b.T).double()
    if llr_kernel.supports(work):
        return llr_kernel.quadratic_rows(work, a, b)
    return torch.stack([_chunked_quadratic(work, ak, bk).double() for ak, bk in zip(a, b, strict=True)], dim=1)


def llr_many(x: torch.Tensor, laws: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """LLR of each input of a batch (N x C x H x W, or N x d) under each of K laws (r, gamma) against the benign
    N(0, I); N x K, float64. On CPU all K come from one read of the inputs (the multi-form kernel), so screening
    against a scan's candidates costs about one pass.

    For gamma >= 0.05 everywhere it is the expanded quadratic a.x^2 + b.x + c with a = (1 - 1/gamma^2)/2,
    b = r/gamma^2, summed in the input's precision in blocks added in float64 (``llr_kernel``; on CUDA
    float32 matrix-vector products). A law with smaller gamma uses the direct float64 form
    -(x - r)^2/(2 gamma^2) + x^2/2, which stays exact where the expansion would cancel catastrophically.
    """
    x = x.flatten(1)
    work = _work(x)
    flat = [_flat_law(x, r, g) for r, g in laws]
    forms = [_expanded_form(r, g, work.dtype) for r, g in flat]
    if all(f is not None for f in forms):
        c = torch.tensor([f[2] for f in forms], dtype=torch.float64, device=x.device)
        return _quadratic(work, torch.stack([f[0] for f in forms]), torch.stack([f[1] for f in forms])) + c
    return torch.stack([_direct_llr(x, r, g) if f is None else _quadratic(work, f[0][None], f[1][None])[:, 0] + f[2]
                        for f, (r, g) in zip(forms, flat, strict=True)], dim=1)


def llr(x: torch.Tensor, r: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """LLR of each input under one law (r, gamma); shape (N,), float64 (see ``llr_many``)."""
    return llr_many(x, [(r, gamma)])[:, 0]


def _quadratic_form(mean: np.ndarray, scale: np.ndarray, r: np.ndarray, g: np.ndarray):  # noqa: ANN202
    """Coefficients (a, b, c) of LLR = sum a z^2 + b z + c when x = mean + scale * z, z ~ N(0, I)."""
    inv = 1.0 / (g * g)
    # -(m + s z - r)^2 / (2 g^2) + (m + s z)^2 / 2 - log g, expanded in z
    a = 0.5 * scale**2 * (1.0 - inv)
    b = scale * (mean - (mean - r) * inv)
    c = -np.log(g) - 0.5 * (mean - r) ** 2 * inv + 0.5 * mean**2
    return a, b, c


def _quad_segment(f: Callable[[float], float], lo: float, hi: float) -> float:
    """Integral of f over [lo, hi], without quad's IntegrationWarning: a few pixels at very small gamma make the
    integrand oscillate fast and quad warns on some segments, yet the sum stays accurate (a 2x2 patch at gamma
    0.1 matches Monte Carlo in ``benchmarks/results/tight_trigger.md`` and in the tests), so the warning would
    only alarm users of ``check-inputs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        return integrate.quad(f, lo, hi, limit=200, epsabs=1e-12, epsrel=1e-10)[0]


def _live(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The terms that vary: dimensions where the trigger is N(0, 1) (a = b = 0) add only their constant."""
    a, b = (np.asarray(v, dtype=np.float64).ravel() for v in (a, b))
    live = (a != 0) | (b != 0)
    return a[live], b[live]


def _method_of_live(a: np.ndarray, b: np.ndarray) -> str:
    if not np.any(a):
        return "gaussian-closed-form"
    if np.all(a == a[0]) and _noncentrality(float(a[0]), b) <= NCX2_MAX_NONCENTRALITY:
        return "noncentral-chi-square-closed-form"
    return "imhof-generalized-chi-square"


def tail_method(a: np.ndarray, b: np.ndarray) -> str:
    """How ``gchisq_sf`` computes the tail of sum a_i z_i^2 + b_i z_i + c_i: Gaussian when every a_i = 0; a scaled
    non-central chi-square when every live a_i is the same (one gamma over the trigger's support, e.g. a patch:
    exact and instant); Imhof's integral otherwise."""
    return _method_of_live(*_live(a, b))


def gchisq_sf(a: np.ndarray, b: np.ndarray, c: np.ndarray, q: float) -> float:
    """P(sum_i a_i z_i^2 + b_i z_i + c_i > q) for independent standard normals z_i (method: ``tail_method``)."""
    shift = float(np.asarray(c, dtype=np.float64).sum())
    a, b = _live(a, b)
    method = _method_of_live(a, b)
    if method == "gaussian-closed-form":  # exactly Gaussian (a constant when b = 0 too)
        sd = math.sqrt(float((b * b).sum()))
        return float(shift > q) if sd == 0.0 else float(special.ndtr((shift - q) / sd))
    if method == "noncentral-chi-square-closed-form" and (p := _scaled_ncx2_sf(float(a[0]), b, shift, q)) is not None:
        return p
    return imhof_sf(a, b, shift, q)


NCX2_MAX_NONCENTRALITY = 1e4  # beyond, scipy's series may not converge (it warned at 2.5e13); Imhof is fast there


def _noncentrality(a: float, b: np.ndarray) -> float:
    return float((b * b).sum()) / (4.0 * a * a)


def _scaled_ncx2_sf(a: float, b: np.ndarray, shift: float, q: float) -> float | None:
    """P(a sum (z_i + b_i / 2a)^2 - sum b_i^2 / 4a + shift > q): a non-central chi-square(k, lambda) scaled by a.
    None when scipy's series does not converge (the caller falls back to Imhof)."""
    lam = _noncentrality(a, b)
    x = (q - shift + lam * a) / a
    law = stats.chi2(len(b)) if lam == 0.0 else stats.ncx2(len(b), lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            p = float(law.sf(x) if a > 0 else law.cdf(x))
        except RuntimeWarning:
            return None
    return p if math.isfinite(p) else None


def imhof_sf(a: np.ndarray, b: np.ndarray, shift: float, q: float) -> float:
    """P(sum_i a_i z_i^2 + b_i z_i + shift > q) by Imhof's method (some a_i != 0).

    Each term is a_i times a non-central chi-square(1) plus a constant; the phase and modulus below are
    Imhof's theta(u), rho(u) with the constants combined analytically so a_i = 0 needs no special case.
    """
    b2 = b * b

    def log_rho(u: float) -> float:
        au2 = (a * u) ** 2
        return float(0.25 * np.log1p(au2).sum() + (b2 * u * u / 8.0 / (1.0 + au2)).sum())

    def integrand(u: float) -> float:
        if u == 0.0:
            return 0.5 * (float(a.sum()) + shift - q)  # limit of sin(theta)/u
        au = a * u
        theta = 0.5 * np.arctan(au).sum() - (b2 * a * u**3 / 8.0 / (1.0 + au * au)).sum() + 0.5 * (shift - q) * u
        return math.sin(theta) * math.exp(-log_rho(u) - math.log(u))  # underflows to 0, never overflows

    upper = 1.0
    while math.log(upper) + log_rho(upper) < 40.0 and upper < 1e12:  # integrand below e^-40 beyond
        upper *= 2.0
    # split at a grid so quad never has to find the oscillations on its own
    edges = np.concatenate([[0.0], np.geomspace(min(1e-3, upper / 2), upper, 40)])
    total = sum(_quad_segment(integrand, lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True))
    return float(min(1.0, max(0.0, 0.5 + total / math.pi)))


@dataclass
class _Law:
    """The LLR's law under one hypothesis, as quadratic-form coefficients."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray

    @property
    def mean(self) -> float:
        return float((self.a + self.c).sum())

    @property
    def std(self) -> float:
        return math.sqrt(float((2 * self.a**2 + self.b**2).sum()))

    def sf(self, q: float) -> float:
        return gchisq_sf(self.a, self.b, self.c, q)

    def isf(self, p: float) -> float:
        """The q with P(LLR > q) = p (bracketed root of the monotone tail)."""
        if self.std == 0.0:
            return self.mean
        if not np.any(self.a):  # Gaussian: closed form
            return self.mean + self.std * float(special.ndtri(1.0 - p))
        # bracket around the Gaussian guess, widening as needed: far from the answer the integrand oscillates
        # faster and each evaluation costs more (a tight trigger's cost: benchmarks/results/tight_trigger.md)
        guess = self.mean + self.std * float(special.ndtri(1.0 - p))
        lo, hi, step = guess - self.std, guess + self.std, self.std
        while self.sf(hi) > p:
            lo, hi, step = hi, hi + 2 * step, 2 * step
        while self.sf(lo) < p:
            hi, lo, step = lo, lo - 2 * step, 2 * step
        return float(optimize.brentq(lambda q: self.sf(q) - p, lo, hi, xtol=1e-10 * max(1.0, self.std),
                                     rtol=1e-12))


def _as_batch(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inputs as an N x C x H x W batch of the trigger's shape (one input may come without the batch axis)."""
    x = torch.as_tensor(x)
    if x.dim() == len(shape):
        x = x.unsqueeze(0)
    if tuple(x.shape[1:]) != tuple(shape):
        raise TerdError(f"inputs are {' x '.join(map(str, x.shape[1:]))}, the trigger "
                        f"{' x '.join(map(str, shape))}")
    return x


class InputDetector:
    """Flags initial noises that look like backdoor inputs of a reversed trigger (positive = backdoor).

    ``fpr`` sets the threshold so that a fraction ``fpr`` of benign N(0, I) noise is flagged (exactly, from
    the closed-form benign law); ``fpr=None`` uses the paper's rule LLR > 0.
    """

    def __init__(self, r: torch.Tensor | Trigger, gamma: torch.Tensor | float | None = None,
                 fpr: float | None = DEFAULT_FPR) -> None:
        if isinstance(r, Trigger):
            r, gamma = r.r, r.gamma if gamma is None else gamma
        r = torch.as_tensor(r, dtype=torch.float32)
        gamma = torch.ones_like(r) if gamma is None else torch.as_tensor(gamma, dtype=torch.float32).expand_as(r)
        if fpr is not None and not 0.0 < fpr < 1.0:
            raise TerdError(f"--fpr must be in (0, 1), got {fpr}")
        self.r, self.gamma, self.fpr = r, gamma.clamp(min=GAMMA_FLOOR), fpr
        rn, gn = self.r.double().flatten().numpy(), self.gamma.double().flatten().numpy()
        self.benign_law = _Law(*_quadratic_form(np.zeros_like(rn), np.ones_like(rn), rn, gn))
        self.backdoor_law = _Law(*_quadratic_form(rn, gn, rn, gn))
        self.threshold_paper = 0.0
        self.threshold_fpr = self.benign_law.isf(fpr) if fpr is not None else None
        self.threshold = self.threshold_fpr if fpr is not None else self.threshold_paper

    @property
    def method(self) -> str:
        return tail_method(self.benign_law.a, self.benign_law.b)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """LLR per input (float64, shape (N,)); higher = more backdoor-like."""
        return llr(_as_batch(x, self.r.shape), self.r, self.gamma)

    def is_backdoor(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x) > self.threshold

    def false_positive_rate(self, threshold: float | None = None) -> float:
        """Exact benign false-positive rate of a threshold (default: the detector's)."""
        return self.benign_law.sf(self.threshold if threshold is None else threshold)

    def expected_tpr(self, threshold: float | None = None) -> float:
        """Detection rate if backdoor inputs really are N(r, gamma^2) (the reversed trigger is exact)."""
        return self.backdoor_law.sf(self.threshold if threshold is None else threshold)

    def detection_rate(self, r: torch.Tensor, gamma: torch.Tensor, threshold: float | None = None) -> float:
        """Exact rate at which inputs x = gamma * eps + r (e.g. a true trigger's) are flagged, closed form."""
        mean, scale = (torch.as_tensor(v, dtype=torch.float64).expand_as(self.r).flatten().numpy() for v in (r, gamma))
        rn, gn = self.r.double().flatten().numpy(), self.gamma.double().flatten().numpy()
        return _Law(*_quadratic_form(mean, scale, rn, gn)).sf(self.threshold if threshold is None else threshold)

    def summary(self) -> dict:
        return {"threshold": self.threshold, "threshold_paper": self.threshold_paper,
                "threshold_fpr": self.threshold_fpr, "target_fpr": self.fpr, "method": self.method,
                "fpr_of_paper_rule": self.false_positive_rate(0.0),
                "expected_tpr": self.expected_tpr(), "expected_tpr_paper_rule": self.expected_tpr(0.0)}


def best_possible_tpr(trigger: Trigger, fpr: float = DEFAULT_FPR) -> float:
    """The most ANY detector of x_T alone can catch of a trigger's inputs at benign false-positive rate ``fpr``.

    By the Neyman-Pearson lemma the likelihood-ratio test of the true law N(r, gamma^2) against N(0, I) is the
    most powerful test at its size, so this is the ceiling a reversed trigger is measured against: a small,
    tight trigger (a 2 x 2 patch at 16 px) carries so few nats that even the exact law misses some inputs."""
    return InputDetector(trigger, fpr=fpr).expected_tpr()


MIN_OWN_TPR = 0.5  # a candidate that misses most of its own inputs is too close to benign noise to be a trigger


class CandidateSetDetector:
    """Flags an input when ANY of a scan's candidate triggers flags it (positive = backdoor).

    A scan does not know which candidate is the real trigger; the one it reports (largest M_r) can be the wrong
    one for input detection (photos32 TrojDiff: TPR 0.957 with the reported candidate, 1.0 with the other).
    The benign false-positive budget ``fpr`` is split evenly over the candidates that could be a trigger, so by
    the union bound "any flags" keeps a benign rate of at most ``fpr`` (each term exact, closed form).

    Which candidates could be a trigger: a backdoor input distribution must be told apart from benign noise
    (else the backdoor would fire on ordinary noise), so a candidate whose detector would catch fewer than
    ``min_own_tpr`` of its OWN inputs N(r, gamma^2) at an even share of the budget gets none (it only dilutes
    the others' shares). On the digits16 and photos32 scans these own-input rates are bimodal (0.02-0.25 vs
    0.68-1.0), so any cut between 0.3 and 0.65 keeps the same candidates. When none passes, the one closest to
    passing is kept. ``fpr=None``: every candidate, each with the paper's LLR > 0. ``score`` is the largest
    margin over a kept candidate's threshold, so the threshold is 0.

    That screen keeps ordinary candidates too (benign models' reversion candidates pass it), so when a scan's
    verdict flags the model through its patch probe, ``implicated`` -- the candidates that verdict implicates
    (:func:`terd.defense.implicated.implicated_candidates`) -- replaces it: the budget is split over those alone.
    """

    def __init__(self, triggers: list[Trigger], fpr: float | None = DEFAULT_FPR, *,
                 min_own_tpr: float = MIN_OWN_TPR, implicated: list[int] | None = None) -> None:
        if not triggers:
            raise TerdError("no candidate triggers given")
        if len({t.shape for t in triggers}) != 1:
            raise TerdError(f"candidate triggers differ in shape: {sorted({t.shape for t in triggers})}")
        if fpr is not None and not 0.0 < fpr < 1.0:
            raise TerdError(f"--fpr must be in (0, 1), got {fpr}")
        if implicated and not all(0 <= i < len(triggers) for i in implicated):
            raise TerdError(f"implicated candidates {list(implicated)} out of range for {len(triggers)} candidates")
        self.fpr, self.own_tpr, self.implicated = fpr, None, sorted(set(implicated)) if implicated else None
        self.kept, built = list(range(len(triggers))), None
        if self.implicated:
            self.kept = self.implicated
        elif fpr is not None and len(triggers) > 1:
            even = [InputDetector(t, fpr=fpr / len(triggers)) for t in triggers]
            self.own_tpr = [d.expected_tpr() for d in even]
            self.kept = [i for i, v in enumerate(self.own_tpr) if v >= min_own_tpr]
            self.kept = self.kept or [max(range(len(triggers)), key=self.own_tpr.__getitem__)]
            built = even if len(self.kept) == len(triggers) else None  # all kept: the shares stay even
        each = None if fpr is None else fpr / len(self.kept)
        self.detectors = built or [InputDetector(triggers[i], fpr=each) for i in self.kept]
        self.r = self.detectors[0].r
        self.threshold = 0.0

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Per input, max over candidates of (LLR - that candidate's threshold), float64 (N,); > 0 = flagged.
        All candidates score the inputs in one pass over them (``llr_many``)."""
        x = _as_batch(x, self.r.shape)
        scores = llr_many(x, [(d.r, d.gamma) for d in self.detectors])
        return (scores - torch.tensor([d.threshold for d in self.detectors], dtype=torch.float64,
                                      device=scores.device)).amax(dim=1)

    def is_backdoor(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x) > self.threshold

    def false_positive_bound(self) -> float:
        """Upper bound on the benign false-positive rate: the sum of each candidate's exact rate."""
        return min(1.0, sum(d.false_positive_rate() for d in self.detectors))

    def summary(self) -> dict:
        rule = "any candidate the verdict implicates flags" if self.implicated else "any candidate flags"
        return {"rule": rule, "threshold": self.threshold, "target_fpr": self.fpr,
                "fpr_bound": self.false_positive_bound(), "kept_candidates": self.kept,
                "own_input_tpr": self.own_tpr, "candidates": [d.summary() for d in self.detectors]}


def load_input_detector(path: str | Path, fpr: float | None = DEFAULT_FPR,
                        image_shape: tuple[int, int, int] | None = None) -> InputDetector | CandidateSetDetector:
    """The detector a scan's file defines: a candidates file (``r_0``, ``gamma_0``, ...) gives the any-candidate
    detector (over the candidates its scan's verdict implicated, when it lists them), a trigger file (``r``,
    ``gamma``) the single-trigger one."""
    from terd.models.safe_io import load_tensors

    tensors = load_tensors(path)  # read once: its tensor names say which kind of file it is
    if "r_0" in tensors:
        cands = candidates_from_tensors(tensors, path)
        if image_shape is not None and cands[0].shape != tuple(image_shape):
            raise TerdError(f"{path}: candidates are {' x '.join(map(str, cands[0].shape))}, expected "
                            f"{' x '.join(map(str, image_shape))}")
        implicated = None
        if IMPLICATED in tensors:
            listed = tensors[IMPLICATED]
            if listed.dim() != 1 or listed.is_floating_point() or listed.is_complex():
                raise TerdError(f"{path}: '{IMPLICATED}' must be a 1-D tensor of candidate indices")
            implicated = listed.tolist()
        try:
            return CandidateSetDetector(cands, fpr=fpr, implicated=implicated)
        except TerdError as exc:
            raise TerdError(f"{path}: {exc}") from None
    return InputDetector(Trigger.from_tensors(tensors, path, image_shape), fpr=fpr)


class BackdoorInputError(TerdError):
    """Raised by the guard when initial noise looks like a backdoor input and the policy is "reject"."""


@dataclass
class GuardReport:
    flagged: torch.Tensor  # bool (N,)
    scores: torch.Tensor  # LLR (N,)
    threshold: float

    @property
    def n_flagged(self) -> int:
        return int(self.flagged.sum())


GUARD_POLICIES = ("reject", "drop", "report")


def guard_inputs(detector: InputDetector | CandidateSetDetector, x_T: torch.Tensor, on_flag: str = "reject"
                 ) -> tuple[torch.Tensor, GuardReport]:
    """Screen initial noises before generation.

    ``reject``: raise :class:`BackdoorInputError` if any is flagged; ``drop``: return only the passed ones;
    ``report``: return all of them and let the caller act on the report.
    """
    if on_flag not in GUARD_POLICIES:
        raise ValueError(f"on_flag must be one of {GUARD_POLICIES}")
    scores = detector.score(x_T.detach().cpu())
    report = GuardReport(scores > detector.threshold, scores, detector.threshold)
    if report.n_flagged and on_flag == "reject":
        idx = report.flagged.nonzero().flatten().tolist()
        raise BackdoorInputError(f"{report.n_flagged} of {len(scores)} initial noises look like backdoor inputs "
                                 f"(indices {idx[:10]}{'...' if len(idx) > 10 else ''}); generation refused")
    if on_flag == "drop":
        return x_T[~report.flagged.to(x_T.device)], report
    return x_T, report


def guarded_sample(den, x_T: torch.Tensor, detector: InputDetector | CandidateSetDetector, *,  # noqa: ANN001
                   on_flag: str = "reject", sampler: Callable | None = None, **sample_kwargs) -> tuple[torch.Tensor, GuardReport]:
    """Generate from ``x_T`` only after the guard passed it: the model never sees a rejected input."""
    from terd.sampling import sample_images

    x_ok, report = guard_inputs(detector, x_T, on_flag)
    if x_ok.shape[0] == 0:
        return x_ok.new_zeros((0, *x_ok.shape[1:])), report
    run = sampler or sample_images
    return run(den, x_ok, **sample_kwargs), report
