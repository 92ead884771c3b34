r"""Evaluating a density model: bits/dim of 8-bit images with an honest error bar.

A model is anything with the :class:`~flowattn.models.DensityModel` interface
(``log_prob``, ``dequantize``, ``num_dims``, ``residual_steps()``, ``evaluating()``).
The log-det estimator of every residual step can be swapped for the evaluation
(:func:`using_estimator`); each estimator states its own guarantees
(:meth:`~flowattn.logdet.LogDetEstimator.bias_bound`,
:attr:`~flowattn.logdet.LogDetEstimator.error_bar_certified`), which
:func:`bits_per_dim` sums over the steps into the figure's certified bias bound and
whether its standard error is valid. Paired differences between two evaluations are
:func:`flowattn.metrics.paired_difference`.

References:
    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735
"""

from __future__ import annotations

__all__ = [
    "EXACT_MAX_DIMS",
    "bias_bound",
    "bits_per_dim",
    "default_estimator",
    "estimator_description",
    "per_image_bits_per_dim",
    "series_bias_bound",
    "using_estimator",
]

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from . import metrics
from .logdet import ESTIMATORS, ExactLogDet, LogDetEstimator, RussianRouletteLogDet, make_estimator

#: Images of at most this many values are evaluated with the exact log-det by default.
EXACT_MAX_DIMS = 256
#: Images per block of dequantisation noise drawn from one seeded generator.
NOISE_CHUNK = 1024


def _steps_with_bounds(model) -> list[tuple[str, Any, int, float | None]]:
    """``(name, step, dims, bound)`` of every residual step: its input's number of values
    per image and its branch's certified Lipschitz bound (None where uncertified)."""
    facts = []
    for name, step in model.residual_steps():
        if step.input_shape is None:
            raise ValueError(
                f"residual step {name} has no input_shape: build it with "
                "ResidualTransform(..., input_shape=(C, H, W)) for its certificate"
            )
        facts.append((name, step, math.prod(step.input_shape), step.lipschitz_bound()))
    return facts


def default_estimator(model) -> str:
    """``exact`` when the images have at most :data:`EXACT_MAX_DIMS` values (the dense
    Jacobian is affordable) or the model has no residual steps, else the unbiased
    ``roulette``.

    Examples:
        >>> from flowattn import build_model
        >>> default_estimator(build_model("iresnet", image_shape=(1, 8, 8), size="tiny"))
        'exact'
    """
    if model.num_dims <= EXACT_MAX_DIMS or not any(True for _ in model.residual_steps()):
        return "exact"
    return "roulette"


@contextlib.contextmanager
def using_estimator(
    model, estimator: str | LogDetEstimator | None, **options: Any
) -> Iterator[None]:
    """Temporarily replaces every residual step's log-det estimator.

    ``estimator`` is an instance (shared by every step) or a name for
    :func:`~flowattn.logdet.make_estimator` with ``options``; a named estimator gets each
    step's certified Lipschitz bound (``lipschitz``: it chooses the roulette's
    distribution) unless ``options`` give one. None changes nothing.
    """
    if estimator is None:
        yield
        return
    with _swapped(_steps_with_bounds(model), estimator, options):
        yield


@contextlib.contextmanager
def _swapped(facts: list, estimator: str | LogDetEstimator, options: dict) -> Iterator[None]:
    """:func:`using_estimator` on the steps of ``facts`` (:func:`_steps_with_bounds`)."""
    saved = [(step, step.estimator) for _, step, _, _ in facts]
    try:
        for _, step, _, bound in facts:
            if isinstance(estimator, LogDetEstimator):
                step.estimator = estimator
            else:
                swapped = make_estimator(estimator, **{"lipschitz": bound, **options})
                swapped.generator = step.estimator.generator  # the model's draws stay its own
                step.estimator = swapped
        yield
    finally:
        for step, original in saved:
            step.estimator = original


def estimator_description(model) -> str:
    """The residual steps' current log-det estimator(s) in one line, or that there are
    none (roulettes that differ only in the p chosen from each step's bound share a
    line)."""
    groups: dict[tuple, list[LogDetEstimator]] = {}
    for _, step in model.residual_steps():
        est = step.estimator
        if isinstance(est, RussianRouletteLogDet):
            key = (type(est), est.n_exact, est.distribution, est.lam, est.per_sample,
                   est.n_probes, est.probe)  # fmt: skip
        else:
            key = (type(est), est.describe())
        groups.setdefault(key, []).append(est)
    names = [
        RussianRouletteLogDet.describe_steps(group)
        if isinstance(group[0], RussianRouletteLogDet)
        else group[0].describe()
        for group in groups.values()
    ]
    return "; ".join(names) if names else "exact (no residual steps)"


def bias_bound(model) -> float:
    """A certified bound, in bits/dim, on the bias of the log-density with the residual
    steps' current estimators: the sum of each step's
    :meth:`~flowattn.logdet.LogDetEstimator.bias_bound` over :math:`D \\ln 2`."""
    return _bias_bound(_steps_with_bounds(model), model.num_dims)


def _bias_bound(facts: list, num_dims: int) -> float:
    """:func:`bias_bound` from the steps' facts (:func:`_steps_with_bounds`)."""
    total = sum(step.estimator.bias_bound(bound, dims) for _, step, dims, bound in facts)
    return total / (num_dims * math.log(2))


def series_bias_bound(model, n_terms: int) -> float:
    r"""A certified bound, in bits/dim, on the bias of the log-density when every
    residual step's log-det is the power series truncated after ``n_terms`` terms.

    A step with D values and certified bound :math:`L \geq \|J_g\|` (any induced norm)
    has :math:`|\operatorname{tr}(J_g^k)| \leq D \rho(J_g)^k \leq D L^k`, so its
    truncation error is at most :math:`-D (\ln(1 - L) + \sum_{k \leq n} L^k / k)` nats
    (:func:`~flowattn.logdet.series_truncation_bound`). Infinite when a step is
    uncertified.

    Examples:
        >>> from flowattn import build_model
        >>> model = build_model("iresnet", image_shape=(1, 8, 8), blocks=1, hidden=8)
        >>> series_bias_bound(model, 5) > series_bias_bound(model, 20) > 0
        True
    """
    facts = _steps_with_bounds(model)
    with _swapped(facts, "series", {"n_terms": n_terms}):
        return _bias_bound(facts, model.num_dims)


def bits_per_dim(
    model,
    x: Tensor,
    *,
    repeats: int = 1,
    batch_size: int = 256,
    estimator: str | LogDetEstimator | None = None,
    seed: int = 0,
    progress: bool = False,
    **estimator_options: Any,
) -> metrics.BitsPerDim:
    r"""Bits per dimension of 8-bit images, with an honest standard error.

    Each image is dequantised with uniform noise, :math:`y = (x + u) / 256`, and
    :math:`\mathrm{bpd} = -(\ln p(y) - D \ln 256) / (D \ln 2)`, an upper bound on the
    code length of x (see :mod:`flowattn.metrics`); a model uniform on
    :math:`[0, 1)^D` gets exactly 8. Runs in eval mode.

    The default log-det estimator (:func:`default_estimator`) is exact where affordable,
    else the unbiased Russian roulette with draws independent per image and a
    distribution chosen from each step's certified Lipschitz bound so its variance is
    finite: the standard error over images is then a valid one. A truncated ``series``
    must be asked for; its figure carries the certified bound on its bias
    (:func:`bias_bound`).

    The dequantisation noise comes from its own generator seeded with ``seed`` (image
    i's noise does not depend on ``batch_size`` or on the estimator's draws), so two
    models evaluated with one seed see the same noise and their figures can be compared
    per image (:func:`~flowattn.metrics.paired_difference`).

    Arguments:
        model: A :class:`~flowattn.models.DensityModel`.
        x: uint8 images (N, C, H, W).
        repeats: Dequantisation and log-det draws per image.
        batch_size: Images per forward pass (fewer for the exact estimator on large
            images, whose dense Jacobians are D x D per image).
        estimator: Log-det estimator: a name (``exact``, ``roulette``, ``series``), an
            instance, or None for :func:`default_estimator`.
        seed: Seed of the dequantisation noise.
        progress: Show a progress bar.
        estimator_options: Options of a named estimator (``n_terms``, ``n_probes``,
            ``p``...).

    Returns:
        A :class:`~flowattn.metrics.BitsPerDim`: mean, standard error, the estimator, its
        certified bias bound (0 unless a series was asked for), the per-image values and
        the seconds it took.
    """
    x = model.check_images(x, uint8=True)
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    name = default_estimator(model) if estimator is None else estimator
    if isinstance(name, str) and name not in ESTIMATORS:
        make_estimator(name)  # raises the error that lists the valid names
    if name == "exact" or isinstance(name, ExactLogDet):
        batch_size = min(batch_size, max(1, 2**26 // model.num_dims**2))
    start_time = time.perf_counter()
    facts = _steps_with_bounds(model)  # every step's certificate, once
    with model.evaluating(), _swapped(facts, name, estimator_options), torch.no_grad():
        description = estimator_description(model)
        bias = _bias_bound(facts, model.num_dims)
        certified = all(step.estimator.error_bar_certified for _, step in model.residual_steps())
        values = per_image_bits_per_dim(model, x, repeats, batch_size, seed, progress)
    result = metrics.summarize_bits_per_dim(
        values, description, bias_bound=bias, error_bar_certified=certified
    )
    return dataclasses.replace(result, seconds=time.perf_counter() - start_time)


def per_image_bits_per_dim(
    model, x: Tensor, repeats: int, batch_size: int, seed: int, progress: bool = False
) -> Tensor:
    """Bits/dim (N, repeats) of every uint8 image and draw with the model's current
    estimators; image i's noise comes from the generator of its chunk of
    :data:`NOISE_CHUNK` images, seeded by ``(seed, repeat, chunk)``."""
    values = torch.empty(x.shape[0], repeats, dtype=torch.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=x.shape[0] * repeats, desc="bits/dim", unit="image")
    for r in range(repeats):
        for chunk in range(0, x.shape[0], NOISE_CHUNK):
            xc = x[chunk : chunk + NOISE_CHUNK]
            generator = torch.Generator().manual_seed(hash((seed, r, chunk // NOISE_CHUNK)) % 2**63)
            noise = torch.rand(xc.shape, generator=generator)
            for start in range(0, xc.shape[0], batch_size):
                xb = xc[start : start + batch_size]
                nb = noise[start : start + batch_size]
                y, logdet = model.dequantize.with_noise(xb, nb.to(model.device))
                bpd = metrics.bits_per_dim(model.log_prob(y) + logdet, model.num_dims).cpu()
                values[chunk + start : chunk + start + len(xb), r] = bpd
                if bar is not None:
                    bar.update(len(xb))
    if bar is not None:
        bar.close()
    return values
