import math

import pytest
import torch
from conftest import check_bijection, count_host_reads

from flowattn.transforms.preprocess import LogitTransform, UniformDequantization


def test_dequantization_range_logdet_and_inverse():
    deq = UniformDequantization()
    x = torch.randint(0, 256, (16, 3, 4, 4), dtype=torch.uint8)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0, 255
    y, logabsdet = deq(x)
    assert ((y >= 0) & (y < 1)).all()
    assert torch.allclose(logabsdet.double(), torch.full((16,), -48 * math.log(256.0)).double())
    x_back, _ = deq.inverse(y)
    assert torch.equal(x_back.to(torch.uint8), x)
    # y lies in x's bin [x/256, (x+1)/256)
    assert ((y * 256 - x.float()) >= 0).all() and ((y * 256 - x.float()) < 1).all()


def test_dequantization_centres_and_float_levels():
    deq = UniformDequantization(noise=False)
    x = torch.tensor([[0.0, 1.0, 255.0]])
    y, _ = deq(x)
    assert torch.allclose(y, (x + 0.5) / 256)


@pytest.mark.parametrize("bad", [torch.full((1, 3), 0.5), torch.full((1, 3), 256.0)])
def test_dequantization_rejects_non_levels(bad):
    with pytest.raises(ValueError, match="integer levels"):
        UniformDequantization()(bad)


@pytest.mark.parametrize("alpha", [0.05, 1e-6])
def test_logit_logdet_matches_jacobian(alpha):
    logit = LogitTransform(alpha)
    y = torch.rand(3, 2, 2, 2, dtype=torch.float64)
    y[0, 0, 0, 0], y[0, 0, 0, 1] = 0.0, 1.0
    check_bijection(logit, y)


def test_logit_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\], got range \[-0.5, 1.5\]"):
        LogitTransform()(torch.tensor([[1.5, 0.2, -0.5]]))
    with pytest.raises(ValueError, match="alpha"):
        LogitTransform(0.5)


def test_logit_checks_its_range_with_one_read_back_to_the_host():
    x = torch.rand(2, 3, 4, 4)
    assert count_host_reads(lambda: LogitTransform()(x)) == 1
