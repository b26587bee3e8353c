"""Running a recipe (:func:`run_recipe`): the launch checks, the output folder's lock and
identity, the model and data the recipe names, the method's runner (its registry row), and the
trained model saved atomically to ``OUTPUT/model``."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlcourse.adapters import apply_lora, is_lora, merge_lora
from rlcourse.files import atomic_write_text
from rlcourse.models import load_model, save_model, saved_dtype
from rlcourse.precision import Precision, resolve_precision
from rlcourse.recipes.checks import check_lengths, check_processes, launch_device, refuse_sharding
from rlcourse.recipes.output import check_output, clear_output, identity, output_lock
from rlcourse.recipes.registry import method
from rlcourse.recipes.schema import Recipe
from rlcourse.recipes.typed import RecipeError

__all__ = ["RecipeResult", "read_data", "run_recipe", "training_precision"]


@dataclass
class RecipeResult:
    """What :func:`run_recipe` returns: the trained model and tokenizer, the history rows and
    the directory the model was saved to (``None`` when ``save=False``). ``finished_before``:
    the output folder already held this finished run, which was loaded, not trained again."""

    recipe: Recipe
    model: Any
    tokenizer: Any
    history: list[dict[str, Any]]
    saved_to: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    finished_before: bool = False


def read_data(recipe: Recipe, key: str | None = None) -> list[Any]:
    """The JSONL rows of ``key`` (default: the method's data key, ``data`` or ``prompts``; or
    ``eval_data``) in the format the method reads (its row's ``read``)."""
    row = method(recipe.method)
    key = key or row.data_key
    path = Path(getattr(recipe, key))
    if not path.is_file():
        raise RecipeError(f"{recipe.where(key)}: {path}: no such file")
    return row.read(recipe, path)


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (:func:`rlcourse.files.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def _finished_result(recipe: Recipe, state: Any) -> RecipeResult:
    """The saved model and history of a finished run (nothing is trained again)."""
    import sys

    out = Path(recipe.output)
    if state.is_main_process:
        print(f"{out} already holds the finished run of this recipe (model in {out / 'model'});"
              " nothing to train. Pass --overwrite to train it again.", file=sys.stderr)
    model, tokenizer = None, None
    # A full model is loaded back; a reward model or a LoRA adapter is left where it is.
    if method(recipe.method).saves_lm and (out / "model" / "config.json").is_file():
        model, tokenizer = load_model(out / "model", device="cpu", dtype=recipe.dtype,
                                      trust_remote_code=recipe.trust_remote_code)
    history_file = out / "history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    saved = json.loads((out / "recipe.json").read_text()) if (out / "recipe.json").is_file() \
        else {}
    return RecipeResult(recipe, model, tokenizer, history, out / "model",
                        saved.get("summary", {}), finished_before=True)


def _lock(stack: ExitStack, recipe: Recipe, state: Any) -> None:
    """The main process takes ``OUTPUT/.lock`` for the whole run; every process learns whether
    it got it (a second run into the folder stops at once, all its processes together)."""
    error = None
    if state.is_main_process:
        try:
            stack.enter_context(output_lock(Path(recipe.output)))
        except RecipeError as err:
            error = str(err)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error]
        broadcast_object_list(box, from_process=0)
        error = box[0]
    if error is not None:
        raise RecipeError(error)


def run_recipe(recipe: Recipe, save: bool = True, progress: bool = True,
               overwrite: bool = False) -> RecipeResult:
    """Load the model and data a recipe names, train, and save ``OUTPUT/model`` atomically.

    Also writes ``OUTPUT/history.json`` (the engine's metric rows), ``OUTPUT/recipe.json`` and
    ``OUTPUT/run.json`` (the run's identity: every key that changes the model, the data's and
    the reward function's SHA-256, each model folder's fingerprint; ``status`` running or
    finished). A rerun into the same OUTPUT resumes only when
    the identity is the same; a different one is a :class:`RecipeError` naming the keys that
    differ; a finished one is reported and not trained again. ``overwrite=True`` starts afresh.
    While it runs, ``OUTPUT/.lock`` is held (:func:`rlcourse.recipes.output.output_lock`): a
    second run into the same OUTPUT stops at once with an error naming the folder and the pid.
    Every process of an ``accelerate launch`` runs this; the model goes to the process's own
    device (``accelerate.PartialState().device``), and only the main process writes files.
    """
    from accelerate import PartialState

    row = method(recipe.method)
    train_device = launch_device(recipe)
    # The same flag the engine's Accelerator gets: with device "cpu" several processes
    # (torchrun / accelerate launch) talk over gloo; on GPUs each process takes its own GPU.
    refuse_sharding(recipe)
    state = PartialState(cpu=train_device == "cpu")
    check_processes(recipe, state)
    out = Path(recipe.output)
    blocking = next((q for q in (out, *out.parents) if q.exists() and not q.is_dir()), None)
    if blocking is not None:  # else a FileExistsError traceback from mkdir
        raise RecipeError(f"{recipe.where('output')}: {blocking} is a file, not a folder: "
                          "choose another output")
    with ExitStack() as stack:
        if save:
            _lock(stack, recipe, state)
        status = check_output(recipe, overwrite) if save else "fresh"
        if status == "finished":
            return _finished_result(recipe, state)
        device = str(state.device) if train_device == "auto" else train_device
        precision = training_precision(recipe)  # float32 master weights unless bf16-pure
        model, tokenizer = load_model(recipe.model, device=device, dtype=precision.weights,
                                      trust_remote_code=recipe.trust_remote_code)
        check_lengths(recipe, model)
        if tokenizer.eos_token_id is None:  # every method ends an answer with it
            raise RecipeError(f"{recipe.where('model')}: the tokenizer in {recipe.model} has no "
                              "EOS token, so an answer cannot end; set tokenizer.eos_token and "
                              "save the tokenizer again")
        rows = read_data(recipe)
        eval_rows = read_data(recipe, "eval_data") if recipe.eval_data else None
        state.wait_for_everyone()  # every process has read OUTPUT before the main one changes it
        if save and state.is_main_process:
            if status == "fresh":
                clear_output(out)
            out.mkdir(parents=True, exist_ok=True)
            _write_json(out / "run.json", {"status": "running", "identity": identity(recipe)})
        state.wait_for_everyone()
        model.train()
        model, lora_model = _with_lora(recipe, model)
        if recipe.train is not None and not progress:
            recipe.train.progress = False
        model, history, summary = row.run(recipe, model, tokenizer, rows, eval_rows, progress,
                                          save)
        summary = dict(summary)
        model.eval()
        summary["num_processes"] = state.num_processes
        saved = None
        if save and state.is_main_process:
            model, saved = _save_trained(recipe, model, lora_model, tokenizer, out)
            _write_json(out / "history.json", history)
            _write_json(out / "recipe.json", {**recipe.to_dict(), "summary": summary})
            _write_json(out / "run.json", {"status": "finished", "identity": identity(recipe)})
        state.wait_for_everyone()
    return RecipeResult(recipe, model, tokenizer, history, saved, summary)


def _with_lora(recipe: Recipe, model: Any) -> tuple[Any, Any]:
    """``(model to train, peft model or None)``: with a ``lora`` section every base weight is
    frozen and adapters are trained. A model with a head (the reward model: its row's
    ``lora_backbone``) wraps the adapted backbone itself (its head stays fully trained)."""
    if recipe.lora is None:
        return model, None
    lora_model = apply_lora(model, recipe.lora, seed=recipe.seed)
    if method(recipe.method).lora_backbone:
        return lora_model.get_base_model(), lora_model
    return lora_model, lora_model


def _save_trained(recipe: Recipe, model: Any, lora_model: Any, tokenizer: Any, out: Path
                  ) -> tuple[Any, Path]:
    """Save ``OUTPUT/model``: the full model, or under LoRA the adapter (``adapter_config.json``,
    ``adapter_model.safetensors``) and the tokenizer; with ``lora.merge`` also ``OUTPUT/merged``,
    the adapters folded into the weights (plain ``from_pretrained``). A reward model under LoRA
    is always saved merged (its loader reads a full backbone)."""
    if lora_model is not None and method(recipe.method).lora_backbone:
        merge_lora(lora_model)  # in place: model.model is a plain transformers model again
        return model, save_model(model, tokenizer, out / "model")
    saved = save_model(model, tokenizer, out / "model")
    if recipe.lora is not None and recipe.lora.merge and is_lora(model):
        model = merge_lora(model)
        save_model(model, tokenizer, out / "merged")
    return model, saved


def training_precision(recipe: Recipe) -> Precision:
    """The trained model's precision from ``recipe.dtype`` (:func:`rlcourse.precision.
    resolve_precision`; ``auto`` reads the checkpoint's saved dtype): the dtype its weights
    are loaded in (float32 master weights unless ``bf16-pure``), and the compute dtype, which
    becomes every section's ``mixed_precision`` when that says ``no`` or ``auto``. A section
    asking for another compute dtype than ``dtype`` is a :class:`RecipeError`."""
    precision = resolve_precision(recipe.dtype, saved_dtype(recipe.model))
    for name, section in recipe.sections.items():
        asked = getattr(section, "mixed_precision", None)
        if precision.autocast is None or asked is None:
            continue
        if asked in ("no", "auto"):
            section.mixed_precision = precision.autocast
        elif asked != precision.autocast:
            raise RecipeError(
                f"{recipe.where('dtype')}: dtype: {recipe.dtype} trains float32 weights under "
                f"{precision.autocast} autocast, but {name}.mixed_precision is {asked}; "
                f"write one of them only")
    return precision
