"""Checks before a run trains: how its processes were launched, what the accelerate config
asks for, how the method's per-step work splits over processes, and whether its lengths fit
the model's positions. Each failure is a :class:`RecipeError` saying what to do instead."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from rlcourse.engine import check_device_available, check_report_to
from rlcourse.models import max_positions
from rlcourse.recipes.registry import method
from rlcourse.recipes.typed import RecipeError

__all__ = ["check_lengths", "check_processes", "launch_device", "max_positions",
           "refuse_sharding"]


def launch_device(recipe: Any) -> str:
    """The device setting to train with, after checking how the processes were launched.

    ``torchrun``/``accelerate launch --multi_gpu`` set ``WORLD_SIZE``; without GPUs accelerate
    would then run every process alone (each trains the whole data, all write ``model/``), so
    on a machine without CUDA several processes train on the CPU over gloo, as with
    ``train.device=cpu``. ``accelerate launch --cpu --num_processes N`` starts ONE process
    (its simple launcher) and only leaves ``MASTER_PORT`` behind: that is refused.
    """
    import torch

    row = method(recipe.method)
    settings = recipe.sections.get(row.device_section) if row.device_section else None
    device = getattr(settings, "device", "auto")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if ("WORLD_SIZE" not in os.environ and "MASTER_PORT" in os.environ
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"):
        raise RecipeError(
            "accelerate launch --cpu started one process although --num_processes asked for "
            "more (accelerate's --cpu launcher runs a single process); for several CPU "
            "processes run: torchrun --nproc_per_node N -m rlcourse.recipes RECIPE ... "
            "train.device=cpu")
    if world > 1 and device == "auto" and not torch.cuda.is_available():
        if hasattr(settings, "device"):
            settings.device = "cpu"
        return "cpu"
    key = f"{row.device_section}.device" if row.device_section else "device"
    try:  # before the model loads: a GPU asked for on a machine without one
        check_device_available(device, key)
    except ValueError as err:
        raise RecipeError(f"{recipe.where(key)}: {err}") from None
    for name, section in recipe.sections.items():  # train, rollout, online or rsft
        if getattr(section, "report_to", "none") == "tensorboard":
            logging_dir = getattr(section, "logging_dir", recipe.output)  # RL: OUTPUT itself
            try:
                check_report_to(SimpleNamespace(report_to="tensorboard", logging_dir=logging_dir))
            except ValueError as err:
                raise RecipeError(f"{recipe.where(f'{name}.report_to')}: {err}") from None
    return device


def refuse_sharding(recipe: Any) -> None:
    """FSDP (and DeepSpeed) asked for by an ``accelerate`` config are refused, not ignored.

    On CPU, accelerate (1.16) turns FSDP on only for accelerator devices (``MULTI_GPU``,
    ``MULTI_XPU``, ...), never for ``MULTI_CPU``: an FSDP config with ``use_cpu: true`` runs
    plain DDP, and without it every process would train alone. On GPUs the recipes' checkpoints
    and ``OUTPUT/model`` are written by the main process from its unwrapped model, which under
    FSDP holds only its own shard of each weight. Either way the user would not get what the
    config says, so the run stops here.
    """
    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "false").lower() == "true":
            raise RecipeError(
                f"{recipe.source}: the accelerate config asks for {name} ({var}=true), which "
                "the recipes do not support: on CPU accelerate ignores FSDP and runs DDP, and "
                "the checkpoints and OUTPUT/model are written from the main process's "
                "unwrapped model (under sharding, only its shard). Use data parallelism "
                "(accelerate launch --multi_gpu, or torchrun) and fit a large model with "
                "lora: and train.gradient_checkpointing: true")


def check_processes(recipe: Any, state: Any) -> None:
    """The process group accelerate formed matches the launch, and the method can use it: one
    process for the round-based methods, and a per-step prompt count each process takes an
    equal share of."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    n = state.num_processes
    if world != n:
        raise RecipeError(f"launched as {world} processes (WORLD_SIZE) but accelerate formed a "
                          f"group of {n} ({state.distributed_type}); each "
                          "process would train alone. Set train.device to match the machine")
    row = method(recipe.method)
    if row.split_key is not None:
        per = recipe.value(row.split_key)
        if per % n:
            raise RecipeError(f"{recipe.where(row.split_key)}: {per} per step cannot be "
                              f"split over {n} processes (each takes an equal share of "
                              "every step): use a multiple of the number of processes")


def check_lengths(recipe: Any, model: Any) -> None:
    """The method's length (``max_length``, ``rollout.max_new_tokens``, ``online.max_length``,
    ...: its row's ``length_key``) fits the model's positions; else an ``IndexError`` would
    come from deep in the model."""
    key = method(recipe.method).length_key
    length, positions = recipe.value(key), max_positions(model)
    if positions is not None and length > positions:
        raise RecipeError(f"{recipe.where(key)}: {length} is longer than the model's "
                          f"{positions} positions (max_position_embeddings of {recipe.model})")
