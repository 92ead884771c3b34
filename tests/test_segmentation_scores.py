import pytest
import torch

from flowattn.segmentation.scores import cod_scores


def _mask() -> torch.Tensor:
    m = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    m[..., 8:20, 10:24] = True
    return m


def test_a_perfect_map_scores_one_and_no_error():
    m = _mask()
    s = cod_scores(m.float(), m)
    assert s.s_measure == pytest.approx(1, abs=1e-9) and s.weighted_f == pytest.approx(1)
    assert s.max_e == pytest.approx(1, abs=2e-3) and s.mae == 0


def test_the_inverted_map_scores_zero():
    m = _mask()
    s = cod_scores((~m).float(), m)
    assert s.s_measure == pytest.approx(0, abs=1e-9) and s.weighted_f == pytest.approx(0)
    assert s.mae == 1


def test_hand_computed_values_on_an_empty_mask():
    """With no object the S-measure is 1 - mean(map) (Fan et al. 2017, eq. 5's special
    case) and the MAE is the map's mean: a constant map of 64/255 gives both."""
    m = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    s = cod_scores(torch.full(m.shape, 64 / 255), m)
    assert s.s_measure == pytest.approx(1 - 64 / 255) and s.mae == pytest.approx(64 / 255)
    assert s.per_image_s == pytest.approx((1 - 64 / 255,) * 2)


def test_mae_against_a_direct_computation():
    torch.manual_seed(0)
    m = torch.rand(3, 1, 24, 24) > 0.7
    pred = torch.rand(3, 1, 24, 24)
    pred[:, :, 0, 0], pred[:, :, 0, 1] = 0, 1  # min-max normalisation is then identity
    expected = ((pred * 255).round() / 255 - m.double()).abs().mean()
    assert cod_scores(pred, m).mae == pytest.approx(expected.item(), abs=1e-6)  # float32 sums


@pytest.mark.parametrize(
    "pred, mask, message",
    [
        (torch.rand(2, 1, 8, 8), torch.ones(2, 1, 8, 9, dtype=torch.bool), "differ in shape"),
        (torch.rand(2, 3, 8, 8), torch.ones(2, 3, 8, 8, dtype=torch.bool), "one channel"),
        (torch.full((1, 8, 8), float("nan")), torch.ones(1, 8, 8, dtype=torch.bool), "non-finite"),
    ],
)
def test_errors(pred, mask, message):
    with pytest.raises(ValueError, match=message):
        cod_scores(pred, mask)
