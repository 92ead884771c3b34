r"""Image density models: presets, configuration and the model API.

A model is an nflows ``Flow`` over images in :math:`[0, 1]^{C \times H \times W}`:
preprocessing (logit or shift, log-dets counted), then ``scales`` multi-scale levels,
each a squeeze followed by ``blocks`` flow steps, with half of the channels factored
out after every level but the last (the factored-out latents are kept, so decoding
reproduces the input), and a standard normal base distribution on the flattened
latent. Presets:

* ``iresnet``: i-ResNet (Behrmann et al., 2019): ActNorm + certified convolutional
  residual block (ELU). It trains with the unbiased Russian-roulette log-det by default
  (``estimator="series"`` gives i-ResNet's truncated series, whose bias training can
  exploit: see :func:`flowattn.evaluation.series_bias_bound`).
* ``iresnet-attn``: i-ResNet with an invertible attention step, as in Zha et al.
  (2021), at the end of the first scale whose step has at most 64 tokens (the first on
  8x8 images, the second on 32x32; ``attention_scale`` picks another); ``attention``
  picks the kind (default ``external``).
* ``resflow``: Residual Flows (Chen et al., 2019): LipSwish, unbiased Russian-roulette
  log-det with the Neumann gradient.
* ``glow``: Glow (Kingma & Dhariwal, 2018): ActNorm, 1x1 convolution, affine coupling.
* ``glow-attn``: Glow with ordinary (non-invertible) self-attention in the coupling
  conditioners of the first scale.

``size`` (``tiny``, ``small``, ``paper``) sets ``scales``, ``blocks`` and ``hidden``
unless they are given; ``paper`` is 3 scales x 16 blocks x 512 hidden channels.

References:
    | Invertible Attention (Zha et al., 2021)
    | https://arxiv.org/abs/2106.09003

    | Invertible Residual Networks (Behrmann et al., 2019)
    | https://arxiv.org/abs/1811.00995

    | Residual Flows for Invertible Generative Modeling (Chen et al., 2019)
    | https://arxiv.org/abs/1906.02735

    | Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma & Dhariwal, 2018)
    | https://arxiv.org/abs/1807.03039
"""

from .builder import build_model
from .config import EXTRA_STEPS, MAX_ATTENTION_TOKENS, PRESETS, SIZES, ModelConfig, Preset
from .density import DensityModel, draw_from

__all__ = [
    "EXTRA_STEPS",
    "MAX_ATTENTION_TOKENS",
    "PRESETS",
    "SIZES",
    "DensityModel",
    "ModelConfig",
    "Preset",
    "build_model",
    "draw_from",
]
