"""The output folder: the run's identity (``OUTPUT/run.json``), what a rerun does (resume, say
the run is finished, or refuse a different recipe), and the lock that keeps two runs out of
one folder at once (``OUTPUT/.lock``)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlcourse.files import directory_fingerprint, file_sha256
from rlcourse.recipes.registry import method
from rlcourse.recipes.rewards import reward_fn_source
from rlcourse.recipes.typed import RecipeError

__all__ = ["RUN_FILES", "check_output", "clear_output", "identity", "model_fingerprint",
           "output_lock"]

#: Top-level keys that do not change the trained model (the sections' own are declared on them,
#: :attr:`rlcourse.recipes.registry.Section.not_identity`).
_NOT_IDENTITY = {"source", "output", "eval_data"}
#: What a run writes into OUTPUT (``--overwrite`` removes these and nothing else).
RUN_FILES = ("run.json", "recipe.json", "history.json", "history.jsonl", "model", "merged",
             "checkpoints", "tensorboard")
#: Identity keys added after runs had been recorded without them: a ``run.json`` that lacks one
#: was written before it existed, and is compared on the other keys only.
_ADDED_IDENTITY_KEYS = ("model (files)", "reward_model (files)", "reference_model (files)",
                        "reward_fn (source sha256)")
#: Recipe keys added after runs were recorded, with the value those runs trained with: a
#: ``run.json`` without one is the same run when the recipe keeps that value (a run started
#: before ``rollout.warmup_steps`` existed had no warm-up, and resumes unless one is asked for).
_ADDED_SETTINGS: dict[str, Any] = {"rollout.warmup_steps": 0, "rollout.lr_multipliers": {},
                                   "rollout.lr_decay": "constant"}
#: Identity keys no longer recorded (``model (fingerprint)`` hashed every file under the folder,
#: a run folder or ``.git`` inside it included): a ``run.json`` holding one is not compared on it.
_RETIRED_IDENTITY_KEYS = ("model (fingerprint)", "reward_model (fingerprint)",
                          "reference_model (fingerprint)")
#: Endings of the files that define a model in its folder (only files directly in it, as
#: ``from_pretrained`` reads them): weights (``*.safetensors``, ``*.bin`` and their indexes),
#: ``config.json``, ``generation_config.json``, tokenizer files (``tokenizer.json``,
#: ``tokenizer_config.json``, ``special_tokens_map.json``, ``vocab.*``, ``merges.txt``,
#: ``*.model``, ``chat_template.jinja``), adapters (``adapter_config.json``,
#: ``adapter_model.safetensors``), the head of a reward model, and a model's own code (``*.py``).
MODEL_FILE_ENDINGS = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken",
                      ".py")


def _is_model_file(relative: Path) -> bool:
    return (len(relative.parts) == 1 and not relative.name.startswith(".")
            and relative.name.endswith(MODEL_FILE_ENDINGS))


def model_fingerprint(path: str | os.PathLike) -> str | None:
    """:func:`rlcourse.files.directory_fingerprint` of the files that define the model in folder
    ``path`` (:data:`MODEL_FILE_ENDINGS`, directly in it): a run's output folder inside the model
    folder, or the model folder being a git clone (``.git/``), leaves it unchanged."""
    return directory_fingerprint(path, include=_is_model_file)


def identity(recipe: Any) -> dict[str, Any]:
    """What makes two runs the same run: every recipe key that changes the trained model
    (dotted, e.g. ``train.lr``), the SHA-256 of each data file's content and of the file that
    defines ``reward_fn``, and a fingerprint of each model directory (:func:`model_fingerprint`):
    a path names a folder, and another checkpoint saved into the same folder must not pass for
    the first."""
    row = method(recipe.method)
    skip = set(_NOT_IDENTITY) | {f"{s.name}.{k}" for s in row.sections for k in s.not_identity}
    nested = {"loss", "lora", *(s.name for s in row.sections)}
    flat: dict[str, Any] = {}

    def walk(obj: Mapping[str, Any], prefix: str) -> None:
        for k, v in obj.items():
            if isinstance(v, Mapping) and v and k in nested:
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v

    walk(recipe.to_dict(), "")
    for key in ("model", "data", "prompts", "reward_model", "reference_model"):
        if isinstance(flat.get(key), str):  # ./m and m are the same model
            flat[key] = os.path.abspath(flat[key])
    for key in ("data", "prompts"):
        path = getattr(recipe, key, None)
        if path:
            flat[f"{key} (content sha256)"] = file_sha256(path) if Path(path).is_file() else None
    for key in ("model", "reward_model", "reference_model"):
        if isinstance(flat.get(key), str):
            flat[f"{key} (files)"] = model_fingerprint(flat[key])
    if getattr(recipe, "reward_fn", None):
        flat["reward_fn (source sha256)"] = reward_fn_source(recipe)
    return {k: v for k, v in flat.items() if k not in skip}


def check_output(recipe: Any, overwrite: bool) -> str:
    """``"fresh"``, ``"resume"`` (a partial run of this same recipe) or ``"finished"``.

    A folder holding a run of another recipe (other method, data, hyperparameters) is an error
    that names the differing keys, unless ``overwrite``; a folder holding run files that this
    module did not describe (no ``run.json``) is an error too: it cannot be told apart.
    """
    out = Path(recipe.output)
    present = [n for n in RUN_FILES if (out / n).exists()]
    if overwrite or not present:
        return "fresh"
    info_path = out / "run.json"
    if not info_path.is_file():
        raise RecipeError(
            f"{recipe.where('output')}: {out} already holds {', '.join(present)} but no "
            "run.json saying which recipe wrote them; pass --overwrite to start afresh, or "
            "choose another output")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    train = recipe.sections.get("train")  # the engine's checkpoint_dir; else OUTPUT/checkpoints
    checkpoints = (Path(train.checkpoint_dir) if train.checkpoint_dir else None) \
        if train is not None else out / "checkpoints"
    # a finished round's checkpoint (step-*) or one inside a round (round-*/step-*)
    if info.get("status") != "finished" and not (checkpoints and any(checkpoints.rglob("step-*"))):
        return "fresh"  # stopped before its first checkpoint: nothing to resume or to protect
    before, now = info.get("identity", {}), identity(recipe)
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)
                    and not (k in _ADDED_IDENTITY_KEYS and k not in before)
                    and not (k in _ADDED_SETTINGS and k not in before
                             and now.get(k) == _ADDED_SETTINGS[k])
                    and not (k in _RETIRED_IDENTITY_KEYS and k not in now))
    if differ:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in differ[:8])
        kind = "a finished" if info.get("status") == "finished" else "an unfinished"
        raise RecipeError(
            f"{recipe.where(differ[0] if differ[0] in recipe.lines else 'output')}: {out} holds "
            f"{kind} run of a different recipe ({len(differ)} key(s) differ: {shown}"
            f"{' ...' if len(differ) > 8 else ''}); resuming it would "
            "mix two runs. Pass --overwrite to start afresh, or choose another output")
    return "finished" if info.get("status") == "finished" else "resume"


def clear_output(out: Path) -> None:
    """Remove what a previous run wrote into ``out`` (only the run's own files)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``OUTPUT/.lock`` (holding this process's pid) while
    the block runs; another run into the same folder at that time is a :class:`RecipeError`
    naming the folder and the holder's pid, at once (never a wait). The operating system
    releases the lock when the holder exits, however it exits."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RecipeError(f"{out}: another run is writing into this output folder (pid "
                              f"{holder}, holding {out / '.lock'}); wait for it to finish, or "
                              "choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
