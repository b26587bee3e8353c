"""How much memory a method needs before a single activation is stored (layer 1, pure arithmetic).

Mixed-precision training with Adam keeps, per trainable parameter (Rajbhandari et al., 2020,
"ZeRO", section 3.1):

    2 bytes  bf16/fp16 weights  +  2 bytes  gradients
  + 4 bytes  fp32 master weights + 4 bytes Adam first moment + 4 bytes Adam second moment
  = 16 bytes per parameter.

A frozen model (reward model, reference model) needs only its weights: 2 bytes per parameter in
bf16. Activations, the KV cache of generation and framework overhead come on top and depend on
batch size and sequence length; they are left out here on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES_TRAINABLE_MIXED_ADAM = 16
BYTES_FROZEN_HALF = 2
GIB = 2**30


@dataclass(frozen=True)
class ModelRole:
    """One model a method keeps in memory: its name, whether it is trained, size in parameters."""

    name: str
    trainable: bool
    n_params: int

    @property
    def bytes(self) -> int:
        """16 N bytes if trained with mixed-precision Adam, 2 N bytes if frozen in bf16."""
        per_param = BYTES_TRAINABLE_MIXED_ADAM if self.trainable else BYTES_FROZEN_HALF
        return per_param * self.n_params


def model_roles(method: str, n_params: int, precompute_reference: bool = False) -> list[ModelRole]:
    """The models ``method`` holds at once, all assumed to have ``n_params`` parameters.

    * ``ppo``: actor and critic trained, reward model and reference frozen (the four models);
    * ``dpo``, ``ipo``, ``rdpo``, ``kto``: policy trained and a frozen reference, unless the
      reference log-probs are precomputed once before training (then the reference is released);
    * ``orpo``, ``simpo``, ``sft``: the policy alone.
    """
    method = method.lower()
    policy = ModelRole("policy", True, n_params)
    if method == "ppo":
        return [
            ModelRole("actor", True, n_params),
            ModelRole("critic", True, n_params),
            ModelRole("reward model", False, n_params),
            ModelRole("reference", False, n_params),
        ]
    if method in {"dpo", "ipo", "rdpo", "kto"}:
        if precompute_reference:
            return [policy]
        return [policy, ModelRole("reference", False, n_params)]
    if method in {"orpo", "simpo", "sft"}:
        return [policy]
    known = "ppo, dpo, ipo, rdpo, kto, orpo, simpo, sft"
    raise ValueError(f"unknown method {method!r}; expected one of {known}")


def method_memory_gib(method: str, n_params: int, precompute_reference: bool = False) -> float:
    """Weights, gradients and optimiser state of every model ``method`` holds, in GiB:
    :math:`\\sum_m b_m N / 2^{30}` with :math:`b_m = 16` (trained) or :math:`2` (frozen)."""
    return sum(r.bytes for r in model_roles(method, n_params, precompute_reference)) / GIB
