import pytest

from rlcourse.memory import GIB, method_memory_gib, model_roles


def test_ppo_holds_four_models_two_trained():
    roles = model_roles("ppo", 10)
    assert len(roles) == 4
    assert sum(r.trainable for r in roles) == 2


def test_seven_billion_parameters_by_hand():
    n = 7_000_000_000
    # PPO: 2 x 16 bytes (actor, critic) + 2 x 2 bytes (reward, reference) = 36 bytes per parameter.
    assert method_memory_gib("ppo", n) == pytest.approx(36 * n / 2**30)
    # DPO: policy 16 + reference 2 = 18 bytes; with precomputed reference log-probs 16 bytes.
    assert method_memory_gib("dpo", n) == pytest.approx(18 * n / GIB)
    assert method_memory_gib("dpo", n, precompute_reference=True) == pytest.approx(16 * n / GIB)
    # ORPO / SimPO: the policy alone: 112 GB (decimal) = 104.3 GiB.
    assert method_memory_gib("simpo", n) == pytest.approx(104.308, abs=1e-3)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="grpo"):
        model_roles("grpo", 1)
