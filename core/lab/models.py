"""The one weight writer and loader of runs, the one definition of "a run holding a language model",
and the CPU-thread policy for generation.

Every stage that saves or opens a model goes through here:

    save_model_run(run_id, model, tokenizer)   weights + tokenizer.json + config["model"]
    load_model_run(run_id, device=None)        -> (GPT, tokenizer, run config)
    model_tensors(model)                       the state dict without tied aliases (what is saved)
    load_model_weights(model, tensors, source) copy saved tensors in, naming any misfit tensor

`model_tensors` / `load_model_weights` work for any nn.Module (the GPT, a classifier built on it,
a LoRA-wrapped model): tied tensors (wte = lm_head) are stored once and re-tied on load.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from core.gpt.errors import ModelConfigError
from core.gpt.model import GPT, GPTConfig
from core.lab import adapters, runs  # adapters imports this module back: used at call time only
from core.lab.errors import CorruptRunError
from core.lab.tokenizer_files import load_tokenizer, save_tokenizer

# Runs whose weights are a whole language model (a GPT with its output head), which stages 2, 3, 5,
# 6 and 7 can open with `load_model_run`. A classify run's head scores two classes, not tokens.
LANGUAGE_MODEL_STAGES = ("pretrain", "import", "instruct", "prefer")

# A cached decoding step of a small model is a handful of tiny matrix-vector products: a second CPU
# thread cannot share such little work and only adds waiting. When another process keeps the cores
# busy (a training job), the waiting dominates: a 2M-parameter model took ~50x longer per token with
# 2 threads than with 1 here. So models under this many parameters decode on one thread.
SINGLE_THREAD_DECODE_BELOW = 20_000_000


def is_language_model_run(run: runs.Run, require_weights: bool = True) -> bool:
    """True when `run` holds a language model that `load_model_run` can open."""
    if run.error or run.stage not in LANGUAGE_MODEL_STAGES:
        return False
    if run.config.get("lora"):  # parent + adapter
        return adapters.adapter_file(run) is not None or not require_weights
    if "model" not in run.config:
        return False
    return run.has_weights() or not require_weights


def language_model_runs(require_weights: bool = True) -> list[runs.Run]:
    """Every run holding a language model, newest first."""
    return [r for r in runs.list_runs(LANGUAGE_MODEL_STAGES) if is_language_model_run(r, require_weights)]


# ---------------------------------------------------------------------------- tensors


def _storage_key(tensor: torch.Tensor):
    return (tensor.device.type, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases: a tied matrix (wte = lm_head) is stored once, under its
    first name. Works for the GPT and for any module built around it."""
    model = model.module if hasattr(model, "module") else model  # DistributedDataParallel
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = _storage_key(tensor) if tensor.numel() and tensor.device.type != "meta" else None
        if key is not None and key in seen:
            continue  # same storage as an earlier name: the loader re-ties it
        if key is not None:
            seen.add(key)
        out[name] = tensor
    return out


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (" …" if len(names) > 5 else "")


def load_model_weights(model: torch.nn.Module, tensors: dict, source: str = "the weights file"):
    """Copy saved tensors into `model`, naming any tensor that is missing, extra or the wrong shape.
    Tied aliases may be absent from `tensors` (they are filled by the tie); nothing else may."""
    target = model.module if hasattr(model, "module") else model
    expected = model_tensors(target)
    state = target.state_dict()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in state]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        raise CorruptRunError(f"{source} does not match the model config: {'; '.join(parts)}.")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise CorruptRunError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)} but the model config "
                f"needs {tuple(state[name].shape)}."
            )
    target.load_state_dict(tensors, strict=False)  # a tied lm_head.weight stays tied
    return model


load_model_tensors = load_model_weights  # the name core/gpt/train.py's checkpoints used


def model_for_weights(config: GPTConfig, weights, source: str | None = None, build=GPT) -> GPT:
    """The model `build(config)` (a GPT unless told otherwise, e.g. a classifier), built only once
    the weights file's header agrees with it.

    A config.json from a planted run folder (say n_embd 10**6) would otherwise allocate its whole
    size before any check could fail. The model is first built on the `meta` device, where tensors
    have shapes but no memory, and its shapes are compared with the file's header."""
    source = source or str(weights)
    try:
        with torch.device("meta"):
            shapes = build(config).state_dict(keep_vars=True)
    except (RuntimeError, ValueError) as e:  # e.g. sizes whose byte count overflows
        raise CorruptRunError(f"{source}: the model config cannot describe a model ({e}).") from None
    stored = runs.tensor_shapes(weights)
    seen, aliases = set(), set()
    for name, tensor in shapes.items():  # a tied matrix is one Parameter under two names
        if id(tensor) in seen:
            aliases.add(name)
        seen.add(id(tensor))
    missing = [n for n in shapes if n not in stored and n not in aliases]
    unexpected = [n for n in stored if n not in shapes]
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + (
            [f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise CorruptRunError(f"{source} does not match the model config: {'; '.join(parts)}.")
    for name, shape in stored.items():
        if shape != tuple(shapes[name].shape):
            raise CorruptRunError(f"{source}: tensor {name} has shape {shape} but the model config "
                                  f"needs {tuple(shapes[name].shape)}.")
    return build(config)


# ---------------------------------------------------------------------------- runs


def save_model_run(run_id: str, model: GPT, tokenizer) -> None:
    """Write the weights and tokenizer into an existing run and record the model config in config.json."""
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ModelConfigError(
            f"The tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}."
        )
    path = runs.run_dir(run_id)
    if not (path / "config.json").exists():
        raise CorruptRunError(f"Run {run_id!r} has no config.json: create the run first.")
    runs.save_tensors(path / "model.safetensors", model_tensors(model),
                      metadata={"format": "pt", "glassbox": "gpt"})
    if tokenizer is not None:
        save_tokenizer(tokenizer, path / "tokenizer.json")
    config = runs.read_json(path / "config.json")
    config["model"] = model.config.to_dict()
    runs.write_json_atomic(path / "config.json", config)


def load_model_run(run_id: str, device=None):
    """(model, tokenizer, run config dict) of a run that holds a language model. Weights in fp32.

    A LoRA run holds only its adapter: it loads as its parent plus the adapter, merged."""
    run = runs.open_run(run_id)
    if run.config.get("lora"):
        return adapters.load_adapter_run(run_id, device=device)
    if "model" not in run.config:
        raise CorruptRunError(f"Run {run_id!r} holds no model (its config.json has no 'model').")
    try:
        config = GPTConfig.from_dict(run.config["model"])
    except ModelConfigError as e:
        raise CorruptRunError(f"{run.path / 'config.json'}: {e}") from None
    weights = run.path / "model.safetensors"
    model = model_for_weights(config, weights)
    load_model_weights(model, runs.load_tensors(weights), source=str(weights))
    tokenizer_path = run.path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise CorruptRunError(f"{tokenizer_path} is missing.")
    tokenizer = load_tokenizer(tokenizer_path)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer, run.config


@functools.lru_cache(maxsize=2)
def _cached_model_run(run_id: str, stamp: float):
    model, tokenizer, _ = load_model_run(run_id)
    return model, tokenizer


def cached_model_run(run_id: str):
    """(model, tokenizer) of a run, kept in memory for the pages (the two most recent runs) and
    reloaded when the run's weights file changes. Treat the model as read-only."""
    weights = runs.open_run(run_id).file("model.safetensors")
    return _cached_model_run(run_id, weights.stat().st_mtime if weights.is_file() else 0.0)


# ---------------------------------------------------------------------------- generation threads


def decode_threads(model: torch.nn.Module) -> int | None:
    """How many CPU threads generation with `model` should use (None = leave the setting alone)."""
    try:
        parameter = next(model.parameters())
    except StopIteration:
        return None
    n_params = sum(p.numel() for p in model.parameters())
    if parameter.device.type == "cpu" and n_params < SINGLE_THREAD_DECODE_BELOW:
        return 1
    return None


@contextlib.contextmanager
def generation_threads(model: torch.nn.Module):
    """Wrap generation in this: small models decode on one CPU thread (see SINGLE_THREAD_DECODE_BELOW);
    the thread count is restored afterwards, whatever happens inside."""
    before = torch.get_num_threads()
    wanted = decode_threads(model)
    if wanted is not None and wanted < before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
