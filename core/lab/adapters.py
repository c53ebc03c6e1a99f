"""LoRA runs on disk: the adapter alone, plus the name of the run it adapts.

A LoRA run (`config.json` has a `"lora"` block) stores in `model.safetensors` only what training
changed: every `lora_A` / `lora_B` (and any other trainable tensor, e.g. a new classifier head).
The frozen base weights stay in the parent run, named by `config["lora"]["parent"]`:

    save_adapter_run(run_id, model, parent)    adapter + tokenizer + config["model"] + config["lora"]
    load_adapter_run(run_id, device=None)      parent + adapter, merged: an ordinary GPT
    load_run(run_id, device=None)              any language-model run (LoRA or whole weights)
    export_merged(run_id, new_run_id)          a standalone run with the merged weights
    adapter_only_checkpoints(model)            the training loop's checkpoints keep the adapter only

A 124M-parameter model's adapter at rank 8 on every matrix is 1.18M numbers (4.7 MB), not 500 MB.
"""

from __future__ import annotations

import shutil

import torch

from core.gpt.lora import add_lora, check_lora_settings, lora_layers, remove_lora, trainable_parameters
from core.lab import models, runs
from core.lab.errors import CorruptRunError, RunError, RunNotFoundError

ADAPTER_FORMAT = "lora-adapter"  # the safetensors metadata "glassbox" of an adapter file
# Where a LoRA run keeps its adapter: stages 5 and 6 write adapter.safetensors when they finish;
# DPO keeps it in model.safetensors, which the training loop's checkpoints write.
ADAPTER_FILES = ("adapter.safetensors", "model.safetensors")


def adapter_file(run: runs.Run):
    """The file holding a LoRA run's adapter, or None while it has none."""
    found = [run.path / name for name in ADAPTER_FILES if (run.path / name).is_file()]
    return found[0] if found else None


def has_weights(run: runs.Run) -> bool:
    """True when `run` can be opened as a model: whole weights, or a LoRA adapter."""
    return run.has_weights() or bool(run.config.get("lora") and adapter_file(run))


def _drop_frozen(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: leave out frozen parameters (they live in the parent run)."""
    frozen = {prefix + name for name, p in module.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    for key in [k for k in state_dict if k in frozen]:
        del state_dict[key]


def adapter_only_checkpoints(model: torch.nn.Module) -> torch.nn.Module:
    """From now on `model.state_dict()` holds only its trainable tensors (LoRA's A and B, a new head).

    The shared training loop saves and restores `state_dict()` through core.lab.models, so its
    checkpoints become adapter-only and resume exactly: the frozen weights never change, and they
    are loaded from the parent run before training starts. Call it after `add_lora`.
    """
    if not getattr(model, "_glassbox_adapter_only", False):
        model.register_state_dict_post_hook(_drop_frozen)
        model._glassbox_adapter_only = True
    return model


def lora_config(parent: str, rank: int, alpha: float | None, targets, model=None) -> dict:
    """The `"lora"` block of a run's config.json."""
    rank, alpha, targets = check_lora_settings(rank, alpha, targets)
    block = {"parent": runs.validate_run_id(parent), "rank": rank, "alpha": alpha, "targets": list(targets)}
    if model is not None:
        block["trainable_parameters"] = trainable_parameters(model)
        block["matrices"] = len(lora_layers(model))
    return block


def save_adapter_run(run_id: str, model, parent: str) -> None:
    """Write an adapter run's weights: the trainable tensors, the parent's tokenizer, config["model"]."""
    path = runs.run_dir(run_id)
    config = runs.read_json(path / "config.json")
    if not config.get("lora"):
        raise CorruptRunError(f"Run {run_id!r} has no 'lora' block in its config.json.")
    adapter_only_checkpoints(model)
    runs.save_tensors(path / "model.safetensors", models.model_tensors(model),
                      metadata={"format": "pt", "glassbox": ADAPTER_FORMAT})
    parent_tokenizer = runs.run_dir(parent) / "tokenizer.json"
    if parent_tokenizer.is_file():
        shutil.copyfile(parent_tokenizer, path / "tokenizer.json")
    runs.update_config(run_id, model=model.config.to_dict())


def open_parent(run_id: str, spec: dict) -> runs.Run:
    """The parent run of a LoRA run, or an error naming both."""
    parent = spec.get("parent")
    if not parent:
        raise CorruptRunError(f"Run {run_id!r} is a LoRA run but its config.json names no parent run.")
    try:
        return runs.open_run(parent)
    except RunNotFoundError:
        raise RunNotFoundError(
            f"Run {run_id!r} is a LoRA adapter on top of run {parent!r}, which has been deleted: "
            f"the adapter alone is not a model. Bring back (or re-create) {parent!r}, or delete {run_id!r}."
        ) from None


def load_adapter_run(run_id: str, device=None, merged: bool = True):
    """(model, tokenizer, run config) of a LoRA run: its parent's weights plus its adapter.

    `merged=True` (the default) folds B A into the weights and returns an ordinary GPT; with
    `merged=False` the model keeps its LoRALinear layers (to go on training).
    """
    run = runs.open_run(run_id)
    spec = run.config.get("lora")
    if not spec:
        raise RunError(f"Run {run_id!r} is not a LoRA run.")
    open_parent(run_id, spec)
    model, tokenizer, _ = load_run(spec["parent"], device=None)
    if run.config.get("model") and run.config["model"] != model.config.to_dict():
        raise CorruptRunError(
            f"The parent run {spec['parent']!r} of LoRA run {run_id!r} no longer has the model shape the "
            "adapter was trained on (it was overwritten)."
        )
    add_lora(model, spec["rank"], spec["alpha"], tuple(spec["targets"]))
    adapter_only_checkpoints(model)
    path = adapter_file(run)
    if path is None:
        raise RunError(f"LoRA run {run_id!r} has no adapter yet: wait for its first checkpoint.")
    models.load_model_weights(model, runs.load_tensors(path), source=str(path))
    if merged:
        remove_lora(model)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer, run.config


def load_run(run_id: str, device=None):
    """Any run holding a language model: a LoRA run (parent + adapter, merged) or whole weights."""
    run = runs.open_run(run_id)
    if run.config.get("lora"):
        return load_adapter_run(run_id, device=device)
    return models.load_model_run(run_id, device=device)


def export_merged(run_id: str, new_run_id: str) -> str:
    """A standalone copy of a LoRA run with B A merged into the weights (no parent needed)."""
    model, tokenizer, config = load_adapter_run(run_id)
    kept = {k: v for k, v in config.items() if k not in ("stage", "parent", "created", "lora", "model")}
    with runs.quick_run(new_run_id, config.get("stage") or "import", {**kept, "merged_from": run_id},
                        parent=run_id):
        models.save_model_run(new_run_id, model, tokenizer)
    return new_run_id
