"""Crash-safe training checkpoints: weights, optimiser moments, random-number state and counters.

A checkpoint is three files in the run folder:

    model.safetensors        the weights (tied tensors stored once: core.lab.models.model_tensors)
    train_state.safetensors  AdamW's moments and the RNG state (tensors)
    train_state.json         step, tokens seen, elapsed time, last evaluation, config (counters)

All three are first written in full to `checkpoint.next/` (each atomically); only then are they
moved over the old ones, `train_state.json` last. A crash while writing leaves the old checkpoint
whole (the half-written folder is discarded on the next start); a crash while moving is finished
on the next start (`recover_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from core.gpt.train import TrainState
from core.lab import runs
from core.lab.errors import CorruptRunError
from core.lab.models import load_model_weights, model_tensors

CHECKPOINT_FILES = ("train_state.safetensors", "model.safetensors", "train_state.json")
STAGING_DIR = "checkpoint.next"  # a checkpoint is written here in full, then moved into place


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """Optimiser state as flat tensors (for safetensors) plus its JSON part."""
    if optimizer is None:  # stopped before the first update: there is no state yet
        return {}, {"param_groups": []}
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optim.{index}.{slot}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in state["param_groups"]]
    return tensors, {"param_groups": groups}


def restore_optimizer(optimizer, tensors: dict, param_groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    groups = [dict(g) | ({"betas": tuple(g["betas"])} if "betas" in g else {}) for g in param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(tensors: dict, device: torch.device) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"].to(torch.uint8))
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"].to(torch.uint8), device)


def save_checkpoint(path: Path, model, optimizer, counters: dict, device: torch.device) -> None:
    """Write weights + optimiser + counters so that a crash at any moment leaves one whole checkpoint."""
    staging = path / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    step = str(counters["step"])
    optim_tensors, optim_json = optimizer_tensors(optimizer)
    runs.save_tensors(staging / "train_state.safetensors", optim_tensors | rng_tensors(device), {"step": step})
    runs.save_tensors(staging / "model.safetensors", model_tensors(unwrap(model)), {"step": step, "format": "pt"})
    runs.write_json_atomic(staging / "train_state.json", counters | optim_json)
    _commit_staging(path)


def _commit_staging(path: Path) -> None:
    staging = path / STAGING_DIR
    for name in CHECKPOINT_FILES:  # train_state.json last: it says "this checkpoint is whole"
        if (staging / name).exists():
            os.replace(staging / name, path / name)
    shutil.rmtree(staging, ignore_errors=True)


def recover_checkpoint(path: Path) -> None:
    """Finish or discard a checkpoint that a crash interrupted (see `save_checkpoint`).

    `train_state.json` is written into the staging folder last, so if it is there, all three
    files were complete before any move began: finish the moves. Otherwise the writing itself was
    cut short (or the moves had all finished): the folder is discarded.
    """
    staging = path / STAGING_DIR
    if not staging.exists():
        return
    if (staging / "train_state.json").exists():
        _commit_staging(path)
    else:
        shutil.rmtree(staging, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, device: torch.device) -> dict | None:
    """Restore a run's checkpoint into `model` and `optimizer`; returns its counters (or None)."""
    recover_checkpoint(path)
    if not (path / "train_state.json").exists():
        return None
    counters = runs.read_json(path / "train_state.json")
    state = runs.load_tensors(path / "train_state.safetensors")
    weights = runs.load_tensors(path / "model.safetensors")
    for name in ("train_state.safetensors", "model.safetensors"):
        saved_step = runs.tensors_metadata(path / name).get("step")
        if saved_step is not None and saved_step != str(counters.get("step")):
            raise CorruptRunError(
                f"{path / name} is from step {saved_step} but train_state.json says step "
                f"{counters.get('step')}: the checkpoint is inconsistent."
            )
    load_model_weights(unwrap(model), {k: v.to(device) for k, v in weights.items()}, source=str(path / "model.safetensors"))
    if optimizer is not None and counters.get("param_groups"):
        restore_optimizer(optimizer, state, counters["param_groups"])
    restore_rng(state, device)
    return counters


def resume_state(path: Path, model, config, device: torch.device, make_optimizer) -> TrainState:
    """The TrainState a resumed run continues from (a fresh one when it has no checkpoint yet)."""
    optimizer = make_optimizer(model, config, device)
    counters = load_checkpoint(path, model, optimizer, device)
    if not counters:
        return TrainState()
    has_moments = bool(counters.get("param_groups"))
    return TrainState(step=int(counters["step"]), tokens=int(counters["tokens"]),
                      elapsed_s=float(counters["elapsed_s"]), last_eval=dict(counters.get("last_eval") or {}),
                      checkpoint_step=int(counters["step"]) or None,
                      optimizer=optimizer if has_moments else None)


def truncate_log(path: Path, last_step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    rows = runs.read_jsonl(path)
    kept = [r for r in rows if r.get("step", 0) <= last_step]
    if len(kept) == len(rows) and path.read_bytes().endswith(b"\n"):
        return
    runs.write_bytes_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
