import math

import pytest
import torch

from flowattn.metrics import (
    NonFiniteDensityError,
    bits_per_dim,
    reconstruction_error,
    summarize_bits_per_dim,
)


def test_bits_per_dim_by_hand():
    # A density of 2**-3 per value on D values is 3 bits per dim.
    d = 12
    assert bits_per_dim(torch.tensor(d * math.log(2**-3)), d).item() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        bits_per_dim(torch.tensor(0.0), 0)


def test_summary_mean_and_standard_error():
    values = torch.tensor([[1.0, 3.0], [2.0, 4.0], [6.0, 8.0]])  # per image: 2, 3, 7
    s = summarize_bits_per_dim(values, "exact")
    assert s.mean == pytest.approx(4.0)
    assert s.stderr == pytest.approx(math.sqrt(7.0) / math.sqrt(3))  # sample std of 2,3,7
    assert (s.images, s.repeats, s.estimator) == (3, 2, "exact")
    single = summarize_bits_per_dim(torch.tensor([[1.0, 3.0]]), "x")
    assert single.stderr == pytest.approx(math.sqrt(2.0) / math.sqrt(2))
    assert math.isnan(summarize_bits_per_dim(torch.tensor([[1.0]]), "x").stderr)
    with pytest.raises(NonFiniteDensityError, match="for 2 of 3 images"):
        summarize_bits_per_dim(torch.tensor([[math.inf, 1.0], [2.0, 2.0], [math.nan, 0]]), "x")


def test_reconstruction_error_levels_and_psnr():
    x = torch.zeros(2, 3, dtype=torch.uint8)
    x_hat = x.clone()
    x_hat[0, 0] = 3
    err = reconstruction_error(x, x_hat)
    assert err.max_abs == 3.0
    assert err.mse == pytest.approx(9 / 6)
    assert err.psnr == pytest.approx(10 * math.log10(255**2 / 1.5))
    same = reconstruction_error(x, x)
    assert same.max_abs == 0 and same.psnr == math.inf
    # the same error on the [0, 1] scale
    f = reconstruction_error(x.float() / 255, x_hat.float() / 255, peak=1.0)
    assert f.max_abs == pytest.approx(3.0) and f.psnr == pytest.approx(err.psnr)
    with pytest.raises(ValueError, match="one scale"):
        reconstruction_error(x, x.float())
    with pytest.raises(ValueError, match="shapes differ"):
        reconstruction_error(x, x[:1])
