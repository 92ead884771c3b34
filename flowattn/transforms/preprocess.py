r"""Preprocessing of 8-bit images as flow steps whose log-dets count.

The density-model convention (see :func:`flowattn.metrics.bits_per_dim`): an 8-bit
image :math:`x \in \{0..255\}^D` is dequantised to :math:`y = (x + u) / 256` with
:math:`u \sim U[0, 1)^D`, which is :class:`UniformDequantization`; its log-det
:math:`-D \ln 256` turns a density on :math:`[0, 1)^D` into a lower bound on the
probability of :math:`x`. :class:`LogitTransform` then maps :math:`[0, 1]` to the real
line as in Real NVP. The Glow-style shift :math:`y - 1/2` is nflows'
``PointwiseAffineTransform``.

References:
    | Density estimation using Real NVP (Dinh et al., 2017)
    | https://arxiv.org/abs/1605.08803

    | A note on the evaluation of generative models (Theis et al., 2016)
    | https://arxiv.org/abs/1511.01844
"""

from __future__ import annotations

__all__ = ["LogitTransform", "UniformDequantization"]

import math

import torch
import torch.nn.functional as F
from nflows.transforms import Transform
from torch import Tensor

from ..images import outside_range


def _sum_except_batch(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


class UniformDequantization(Transform):
    r"""Maps integer pixel levels to :math:`y = (x + u) / 2^b` in :math:`[0, 1)`.

    ``forward`` takes images of integer levels :math:`0 .. 2^b - 1` (uint8, converted to
    the module's dtype and device, or a float tensor holding integers) and returns the
    dequantised :math:`y` with log-det
    :math:`-D\, b \ln 2` per sample (the 1/256 scaling; the uniform noise has density
    one). ``inverse`` quantises back, :math:`x = \lfloor 2^b y \rfloor` clamped to the
    valid levels, as a float tensor; it is a left inverse only (many y give one x).

    Arguments:
        bits: Bits per pixel value b (8 for ordinary images).
        noise: Add uniform noise (True) or use the bin centres :math:`(x + 1/2) / 2^b`.

    Examples:
        >>> deq = UniformDequantization()
        >>> x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
        >>> y, logabsdet = deq(x)
        >>> bool(((0 <= y) & (y < 1)).all())
        True
        >>> math.isclose(logabsdet[0], -48 * math.log(256), rel_tol=1e-6)
        True
        >>> bool((deq.inverse(y)[0] == x).all())
        True
    """

    #: The CPU generator of the noise; None: torch's default generator.
    generator: torch.Generator | None = None

    def __init__(self, bits: int = 8, noise: bool = True):
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"bits must be in 1..16, got {bits}")
        self.bits = bits
        self.noise = noise
        # Follows the module's dtype and device (.double(), .to(device)) for uint8 inputs.
        self.register_buffer("_reference", torch.zeros(()), persistent=False)

    @property
    def levels(self) -> int:
        return 2**self.bits

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if inputs.is_floating_point():
            x = inputs
            if not torch.equal(x, x.round()) or outside_range(x, 0, self.levels - 1):
                raise ValueError(
                    f"UniformDequantization expects integer levels 0..{self.levels - 1}; "
                    "got non-integer or out-of-range values (pass uint8 images, not [0, 1] ones)"
                )
        else:
            x = inputs.to(self._reference)
        if not self.noise:
            u = torch.full_like(x, 0.5)
        elif self.generator is None:
            u = torch.rand_like(x)
        else:
            u = torch.rand(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)
        return self.with_noise(x, u)

    def with_noise(self, inputs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``forward`` with the given noise u in [0, 1) (same shape as the images) instead
        of fresh noise: for evaluations whose draws are seeded apart from everything else."""
        if noise.shape != inputs.shape:
            raise ValueError(
                f"noise {tuple(noise.shape)} must match the images {tuple(inputs.shape)}"
            )
        x = inputs if inputs.is_floating_point() else inputs.to(self._reference)
        y = (x + noise.to(x)) / self.levels
        dims = x[0].numel()
        logabsdet = x.new_full((x.shape[0],), -dims * self.bits * math.log(2))
        return y, logabsdet

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.floor(inputs * self.levels).clamp(0, self.levels - 1)
        dims = x[0].numel()
        logabsdet = x.new_full((x.shape[0],), dims * self.bits * math.log(2))
        return x, logabsdet

    def extra_repr(self) -> str:
        return f"bits={self.bits}, noise={self.noise}"


class LogitTransform(Transform):
    r"""Logit preprocessing :math:`z = \mathrm{logit}(\alpha + (1 - 2\alpha) y)`.

    Maps :math:`y \in [0, 1]` to the real line; :math:`\alpha` keeps the end points
    finite. The log-det per sample is
    :math:`\sum_i \ln(1 - 2\alpha) - \ln s_i - \ln(1 - s_i)` with
    :math:`s = \alpha + (1 - 2\alpha) y`. Inputs outside [0, 1] raise a ValueError.

    Arguments:
        alpha: Margin :math:`\alpha \in (0, 1/2)` (Real NVP uses 0.05 on CIFAR-10).

    Examples:
        >>> logit = LogitTransform(0.05)
        >>> y = torch.rand(2, 3, 4, 4)
        >>> z, logabsdet = logit(y)
        >>> y_back, _ = logit.inverse(z)
        >>> bool(torch.allclose(y_back, y, atol=1e-6)), logabsdet.shape
        (True, torch.Size([2]))
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if outside_range(inputs, 0, 1):
            low, high = torch.aminmax(inputs)
            raise ValueError(
                f"LogitTransform expects inputs in [0, 1], got range "
                f"[{float(low):.3g}, {float(high):.3g}]"
            )
        s = self.alpha + (1 - 2 * self.alpha) * inputs
        log_s, log_rest = torch.log(s), torch.log1p(-s)
        z = log_s - log_rest
        logabsdet = _sum_except_batch(math.log(1 - 2 * self.alpha) - log_s - log_rest)
        return z, logabsdet

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(inputs)
        y = (s - self.alpha) / (1 - 2 * self.alpha)
        # d s / d z = s (1 - s) = exp(-softplus(-z) - softplus(z))
        log_ds = -F.softplus(-inputs) - F.softplus(inputs)
        logabsdet = _sum_except_batch(log_ds - math.log(1 - 2 * self.alpha))
        return y, logabsdet

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
