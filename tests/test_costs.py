"""The seed's costs against values computed by hand on small tensors."""

import pytest
import torch

from nst_server import costs


def test_gram_matrix_by_hand():
    # channel 0 = [1, 2], channel 1 = [3, 4] -> G = [[1+4, 3+8], [3+8, 9+16]]
    a = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])           # (1, 2, 1, 2)
    assert costs.gram_matrix(a).tolist() == [[[5.0, 11.0], [11.0, 25.0]]]


def test_content_cost_by_hand():
    a_c = torch.ones(1, 1, 2, 2)
    a_g = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # diff 0, 1, 2, 3 -> 14 / (4 * n_H 2 * n_W 2 * n_C 1) = 14 / 16
    assert costs.content_cost(a_c, a_g).item() == pytest.approx(0.875)


def test_content_cost_rejects_other_shapes():
    with pytest.raises(ValueError, match="equal layer shapes"):
        costs.content_cost(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 3))


def test_style_layer_cost_by_hand():
    a_g = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])         # G = [[5, 11], [11, 25]]
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # (5-1)^2 + 11^2 + 11^2 + (25-1)^2 = 16 + 121 + 121 + 576 = 834; / (4 * n_C^2 4 * (n_H n_W)^2 4) = 834 / 64
    assert costs.style_layer_cost(target, a_g).item() == pytest.approx(834 / 64)


def test_style_layer_cost_zero_for_own_gram():
    a = torch.rand(2, 3, 4, 5)
    assert torch.allclose(costs.style_layer_cost(costs.gram_matrix(a), a), torch.zeros(2), atol=1e-6)


def test_style_gram_target_rescales_to_generated_positions():
    a = torch.rand(1, 3, 4, 4)
    # 16 positions in the style image, 64 in the generated one: four times the unnormalised Gram.
    assert torch.allclose(costs.style_gram_target(a, 64), costs.gram_matrix(a) * 4)
    assert torch.allclose(costs.style_gram_target(a, 16), costs.gram_matrix(a))


def test_costs_are_float32_for_half_inputs():
    a = torch.full((1, 8, 64, 64), 30.0, dtype=torch.float16)   # fp16 sum would overflow past 65504
    gram = costs.gram_matrix(a)
    assert gram.dtype == torch.float32 and torch.isfinite(gram).all()
    assert gram[0, 0, 0].item() == pytest.approx(900.0 * 64 * 64)


def test_total_variation_by_hand():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]]).expand(1, 3, 2, 2)
    # vertical: (2-0)^2 + (4-1)^2 = 13, horizontal: (1-0)^2 + (4-2)^2 = 5 -> 18 per channel, 54 / 12 values
    assert costs.total_variation(image).item() == pytest.approx(54 / 12)
