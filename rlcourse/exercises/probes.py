"""What a reader's training function did to a model, seen from outside it.

The build-it-yourself graders (chapters 7, 8, 9) hand the reader's function a model (and, in
chapter 8, an optimizer) and cannot see the loss it computes. :class:`GradientProbe` watches the
model's parameters through tensor hooks instead, so nothing in the reader's code, the model or
the optimizer changes:

- ``first_gradient``: the sum of the gradients of every backward pass before the parameters
  first moved, i.e. the gradient the first update used (several backward passes before one
  step, gradient accumulation, are summed, as ``.grad`` sums them);
- ``stale``: a backward pass *after* an update found ``.grad`` still holding a gradient from
  before that update: ``optimizer.zero_grad()`` is missing (or comes after the next backward);
- ``backwards`` (backward passes that reached the first parameter) and ``moved`` (whether any
  parameter changed at all).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["GradientProbe", "direction_error"]


class GradientProbe:
    """Use as ``with GradientProbe(model.parameters()) as probe: fn(model, ...)``."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        self.params = [p for p in parameters if p.requires_grad]
        self.start = [p.detach().clone() for p in self.params]
        self._last = [p.detach().clone() for p in self.params]  # at the previous backward pass
        self._fresh: list[torch.Tensor | None] = [None] * len(self.params)
        self._first = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        self._closed = [False] * len(self.params)
        self._handles: list = []
        self.stale = False
        self.backwards = 0

    # one hook sees the gradient of this backward pass alone, before it is added to .grad
    def _incoming(self, i: int):
        def hook(grad: torch.Tensor) -> None:
            p = self.params[i]
            if not torch.equal(p.detach(), self._last[i]):
                self._closed[i] = True  # an update happened: the first gradient is complete
            if not self._closed[i]:
                self._first[i] += grad.detach().double()
            self._fresh[i] = grad.detach().clone()
            if i == 0:
                self.backwards += 1

        return hook

    # the other sees .grad after the addition: anything beyond this pass's gradient was left
    def _accumulated(self, i: int):
        def hook(p: torch.Tensor) -> None:
            fresh = self._fresh[i]
            moved = not torch.equal(p.detach(), self._last[i])
            if moved and fresh is not None and p.grad is not None:
                left = float((p.grad.detach() - fresh).abs().max())
                if left > 1e-6 * float(fresh.abs().max()) + 1e-30:
                    self.stale = True
            self._last[i] = p.detach().clone()

        return hook

    def __enter__(self) -> GradientProbe:
        for i, p in enumerate(self.params):
            self._handles.append(p.register_hook(self._incoming(i)))
            self._handles.append(p.register_post_accumulate_grad_hook(self._accumulated(i)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def first_gradient(self) -> torch.Tensor:
        """The gradient of the first update, all parameters flattened (float64)."""
        return torch.cat([g.flatten() for g in self._first])

    @property
    def moved(self) -> bool:
        """Whether any parameter changed since the probe was made."""
        return any(not torch.equal(p.detach(), s) for p, s in zip(self.params, self.start,
                                                                   strict=True))


def direction_error(g: torch.Tensor, reference: torch.Tensor) -> float:
    """``|| g/|g| - r/|r| ||``: 0 for the same direction at any positive scale, 2 for opposite
    directions (``sqrt(2 (1 - cos))``). Comparing directions accepts a summed loss where the
    reference averages (AdamW hardly sees the scale) and nothing else."""
    g, reference = g.double(), reference.double()
    ng, nr = float(g.norm()), float(reference.norm())
    if ng == 0.0 or nr == 0.0:
        return float("inf") if ng != nr else 0.0
    return float((g / ng - reference / nr).norm())
