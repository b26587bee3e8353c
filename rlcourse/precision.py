"""Mixed precision: which dtype the trained weights live in, which one the forward pass
computes in, and when a low-precision weight cannot take an update (layer 1, torch only).

**Master weights.** Training with AdamW, ``w <- w - lr * m / (sqrt(v) + eps)`` changes a weight
by about ``lr`` per step (exactly ``lr * |g| / (|g| + eps)`` on the first step). A weight stored
in a floating-point format only takes values on a grid: round to nearest turns ``w + d`` back
into ``w`` whenever ``|d| < ulp(w) / 2``, half the spacing of the grid at ``w``. bfloat16 keeps 8
significant bits (unit round-off ``u = 2^-8 ~ 0.0039``): for ``2^(e-1) <= |w| < 2^e``,
``ulp(w) / 2 = 2^(e-9)``, so an update is lost whenever its size relative to the weight,
``lr / |w|``, is below ``2^-9`` to ``2^-8`` (depending on where ``|w|`` sits in its binade).
At DPO's usual ``lr = 5e-7`` every bf16 weight with ``|w| > 2^-12 ~ 2.4e-4`` is frozen: nearly
all of a trained model's weights. The remedy (Micikevicius et al., 2018) is what
``accelerate`` and PyTorch's autocast give: keep the weights, gradients and AdamW state in
float32 and run the forward and backward passes' matrix products in bf16/fp16 under
``torch.autocast``.

**In rlcourse.** A recipe's ``dtype`` names the precision of the computation
(:func:`resolve_precision`): ``bf16`` (or ``auto`` on a checkpoint saved in bf16, as Qwen and
Llama ship) trains float32 master weights under bf16 autocast; pure bf16 weights only with
``dtype: bf16-pure``, asked for on purpose (half the memory of weights, gradients and AdamW
state), and then :func:`warn_lost_updates` says how many weights the learning rate cannot move;
:func:`rlcourse.engine.train` runs the same check on whatever model it is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = [
    "LOW_PRECISION",
    "Precision",
    "half_ulp",
    "lost_update_fraction",
    "resolve_precision",
    "warn_lost_updates",
]

#: Floating-point formats in which a weight cannot take small AdamW updates.
LOW_PRECISION = (torch.bfloat16, torch.float16)

#: Names of a recipe's ``dtype``: the dtype of the computation, and ``bf16-pure``.
_COMPUTE = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16",
            "fp32": None, "float32": None}

#: Share of the trained weights above which :func:`warn_lost_updates` warns.
LOST_SHARE_WARNING = 0.01


def half_ulp(w: torch.Tensor) -> torch.Tensor:
    """The largest update that rounds back to ``w`` in ``w``'s floating-point format, in
    either direction: half the smaller of the two gaps around ``w``. With ``|w| = m 2^e``,
    ``m`` in ``[1/2, 1)`` (``torch.frexp``) and machine epsilon ``eps = 2^(1-p)`` (``p``
    significant bits), the spacing is ``ulp(w) = eps 2^(e-1)`` and the result ``ulp(w) / 2 =
    eps 2^(e-2)``, except at a power of two (``m = 1/2``), where the gap towards zero is half
    as wide: ``ulp(w) / 4``. bf16: ``2^(e-9)`` (or ``2^(e-10)``), between ``2^-9 |w|`` and
    ``2^-8 |w|``. float32, same shape; zeros get 0 (no update is lost there)."""
    eps = torch.finfo(w.dtype).eps
    mantissa, exponent = torch.frexp(w.float() if w.dtype in LOW_PRECISION else w)
    out = eps * torch.exp2(exponent.float() - 2)
    out = torch.where(mantissa.abs() == 0.5, out / 2, out)
    return torch.where(w == 0, torch.zeros_like(out), out)


def lost_update_fraction(params: Iterable[torch.Tensor], lr: float,
                         dtype: torch.dtype | None = None) -> float:
    """The share of the elements of ``params`` that an update of size ``lr`` leaves unchanged,
    whatever its sign, when they are stored in ``dtype`` (default: each tensor's own):
    ``lr < ulp(w) / 2`` (:func:`half_ulp`). With AdamW, whose step is about ``lr`` in size,
    these weights never move. 0 for float32 weights at any learning rate a model trains with."""
    lost = total = 0
    for p in params:
        w = p.detach() if dtype is None else p.detach().to(dtype)
        lost += int((half_ulp(w) > lr).sum())
        total += w.numel()
    return lost / total if total else 0.0


def warn_lost_updates(model: torch.nn.Module, lr: float, where: str = "training") -> float:
    """Warn when trained parameters are stored in bf16/fp16 and more than
    :data:`LOST_SHARE_WARNING` of them would lose an AdamW update of size ``lr``
    (:func:`lost_update_fraction`). Returns that share (0 for float32 weights)."""
    low = [p for p in model.parameters() if p.requires_grad and p.dtype in LOW_PRECISION]
    if not low:
        return 0.0
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    share = lost_update_fraction(low, lr) * sum(p.numel() for p in low) / trained
    if share > LOST_SHARE_WARNING:
        kinds = sorted({str(p.dtype).removeprefix("torch.") for p in low})
        warnings.warn(
            f"{where}: {share:.1%} of the trained weights are {'/'.join(kinds)} and an update "
            f"of lr={lr:g} is below half their spacing (lr < ulp(w)/2, i.e. lr/|w| below "
            "2^-9..2^-8 in bf16): AdamW cannot change them, the loss moves while they stay "
            "as they are. Keep float32 master weights and compute in bf16 (a recipe's "
            "dtype: bf16 or auto; in Python load the model in float32 and train with "
            "mixed_precision='bf16'), or raise the learning rate.",
            stacklevel=3)
    return share


@dataclass(frozen=True)
class Precision:
    """How a trained model is held and run: ``weights`` the dtype of its parameters (and so of
    gradients and AdamW state), ``autocast`` the compute dtype of the forward and backward
    passes (``"bf16"``, ``"fp16"`` or ``None``: as the training section's ``mixed_precision``
    says), ``pure`` whether the weights themselves are low precision (asked for)."""

    weights: torch.dtype
    autocast: str | None
    pure: bool = False


def resolve_precision(dtype: str | None, saved: torch.dtype | None = None) -> Precision:
    """A recipe's ``dtype`` for the model it trains (``saved``: the checkpoint's own dtype).

    ================  =================  ==================  ======================
    ``dtype``         weights            autocast            note
    ================  =================  ==================  ======================
    null, fp32        float32            mixed_precision     the default
    bf16, fp16        float32 (master)   bf16 / fp16         what accelerate does
    auto              float32 (master)   the saved dtype     bf16 for Qwen, Llama
    bf16-pure         bfloat16           mixed_precision     asked for; warned
    ================  =================  ==================  ======================

    Frozen models (reference, reward model) are loaded in the named dtype as they are (no
    update to lose); ``fp16-pure`` is refused: fp16 weights need loss scaling, whose
    ``GradScaler`` refuses fp16 gradients.
    """
    if dtype is None:
        return Precision(torch.float32, None)
    if dtype == "bf16-pure":
        return Precision(torch.bfloat16, None, pure=True)
    if dtype == "auto":
        names = {torch.bfloat16: "bf16", torch.float16: "fp16"}
        return Precision(torch.float32, names.get(saved))
    if dtype not in _COMPUTE:
        raise ValueError(f"dtype must be null, auto, fp32, bf16, fp16 or bf16-pure; got "
                         f"{dtype!r}")
    return Precision(torch.float32, _COMPUTE[dtype])
