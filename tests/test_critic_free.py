import math

import pytest
import torch

from rlcourse.critic_free import grpo_advantages, rloo_advantages


def test_rloo_by_hand():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    # A_1 = 1 - (2 + 6)/2 = -3; A_2 = 2 - (1 + 6)/2 = -1.5; A_3 = 6 - 1.5 = 4.5
    assert torch.allclose(rloo_advantages(r), torch.tensor([[-3.0, -1.5, 4.5]]))


def test_rloo_is_k_over_k_minus_one_times_centred_reward():
    r = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    centred = r - r.mean(1, keepdim=True)
    assert torch.allclose(rloo_advantages(r), 4 / 3 * centred)


def test_grpo_by_hand():
    r = [1.0, 2.0, 6.0]
    mean = sum(r) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 2)  # Bessel-corrected
    expected = [(x - mean) / (std + 1e-4) for x in r]
    got = grpo_advantages(torch.tensor([r], dtype=torch.float64))
    assert got[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_grpo_equal_rewards_give_zero_signal():
    assert torch.equal(grpo_advantages(torch.full((2, 4), 3.0)), torch.zeros(2, 4))


def test_grpo_without_scaling_is_centred_reward():
    r = torch.tensor([[0.0, 1.0, 1.0, 2.0]])
    assert torch.allclose(grpo_advantages(r, scale=False), torch.tensor([[-1.0, 0.0, 0.0, 1.0]]))


@pytest.mark.parametrize("shape", [(4,), (3, 1)])
def test_needs_groups_of_at_least_two(shape):
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(torch.zeros(shape))
