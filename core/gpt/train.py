"""The one training loop, shared by pre-training (stage 4), classification (5) and instructions (6).

What the learner sees on page 4 is this loop at work: every step takes a batch of token windows,
measures how wrong the model's next-token guesses are (the loss), and nudges every weight a little
downhill (AdamW). Around that core sit the things that make a real training run usable:

- a learning-rate schedule: a short linear warm-up, then a cosine decay down to `min_lr` at the end
  of the budget (a budget of steps, tokens or minutes: "give it three minutes");
- gradient clipping (one bad batch cannot throw the weights far) and gradient accumulation
  (a big batch in several small pieces, for memory);
- evaluation on held-out data every `eval_every` steps and a text sample every `sample_every`;
- checkpoints every `checkpoint_every` steps and whenever the user presses Stop, with **exact
  resume**: the batch of step `s` is a pure function of `(seed, s)`, and the model, the optimiser
  moments and the random-number state are all saved, so a run stopped and resumed ends with the
  same loss as one that ran straight through;
- data parallel training under `torchrun`: every process takes its own slice of each global batch
  and DistributedDataParallel averages the gradients, so N processes compute the same step as one.

What differs between stages lives in a `TrainTask` (`core/gpt/`): how to draw a batch, the loss,
the evaluation and the sample. Files written into `checkpoints/<run-id>/`:

    metrics.jsonl          step, tokens, train_loss, lr, tokens_per_s, elapsed_s (+ val_loss, ...)
    samples.jsonl          step, tokens, elapsed_s, text
    model.safetensors      the weights
    train_state.safetensors  optimiser moments and RNG state (tensors)
    train_state.json         step, tokens seen, elapsed time, config (counters)
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from core.lab import runs
from core.gpt.errors import TrainingError

CHECKPOINT_FILES = ("train_state.safetensors", "model.safetensors", "train_state.json")
STAGING_DIR = "checkpoint.next"  # a checkpoint is written here in full, then moved into place


@dataclass
class TrainConfig:
    """How long and how to train. One of the three budgets must be set (the first reached ends)."""

    max_steps: int | None = None
    max_minutes: float | None = None
    max_tokens: int | None = None
    batch_size: int = 32  # sequences per micro-batch (the global batch is batch_size × grad_accum)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_every: int = 100
    eval_batches: int = 20
    sample_every: int = 200
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 1337

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


class TrainTask:
    """What one stage trains on. Subclasses override `get_batch` and usually `evaluate`/`sample`.

    `train` calls `prepare(config, device)` once before the first step, so a task can read
    `self.config` (e.g. `eval_batches`, `batch_size`) and `self.device` in `evaluate`.
    Batches may be returned on the CPU; `train` moves them to the device.
    `evaluate` and `sample` run under `torch.no_grad()` with the model in eval mode.
    """

    config: TrainConfig | None = None
    device: torch.device | None = None

    def prepare(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device

    def check(self, config: TrainConfig) -> None:
        """Raise TrainingError if these settings cannot work with this task's data."""

    def get_batch(self, split: str, step: int, batch_size: int, generator: torch.Generator):
        """The batch of `split` for this `step`: `(inputs, targets)`, drawn with `generator` only."""
        raise NotImplementedError

    def loss(self, model, inputs, targets) -> torch.Tensor:
        _, loss = model(inputs, targets)
        return loss

    def evaluate(self, model) -> dict[str, float]:
        return {}

    def sample(self, model) -> str | None:
        return None

    def tokens_in_batch(self, inputs) -> int:
        return int(inputs.numel())


# ---------------------------------------------------------------------------- schedule


def effective_warmup(config: TrainConfig) -> int:
    """Warm-up length: as configured, but never more than a fifth of a step budget."""
    if config.max_steps:
        return min(config.warmup_steps, config.max_steps // 5)
    return config.warmup_steps


def budget_progress(config: TrainConfig, step: int, tokens: int, elapsed_s: float,
                    reserve_s: float = 0.0) -> float:
    """How much of the budget is used, 0 → 1 (the furthest along of the budgets that are set).

    A step budget counts from the end of the warm-up (as nanoGPT does); `reserve_s` keeps time
    back from a minutes budget for the final evaluation and checkpoint.
    """
    done = 0.0
    if config.max_steps:
        warmup = effective_warmup(config)
        done = max(done, (step - warmup) / max(1, config.max_steps - warmup))
    if config.max_tokens:
        done = max(done, tokens / config.max_tokens)
    if config.max_minutes:
        done = max(done, elapsed_s / max(1e-9, config.max_minutes * 60 - reserve_s))
    return min(max(done, 0.0), 1.0)


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up for `warmup_steps`, then cosine from `lr` down to `min_lr` at the budget's end."""
    warmup = effective_warmup(config)
    if step < warmup:
        return config.lr * (step + 1) / (warmup + 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 → 0
    return config.min_lr + cosine * (config.lr - config.min_lr)


def lr_schedule(config: TrainConfig, total_steps: int, points: int = 200) -> list[tuple[int, float]]:
    """The schedule as (step, lr) points for a chart, assuming the run lasts `total_steps`."""
    points = max(2, min(points, total_steps + 1))
    out = []
    for i in range(points):
        step = round(i * total_steps / (points - 1))
        if config.max_steps:
            progress = budget_progress(config, step, 0, 0.0)
        else:  # a minutes or tokens budget: progress is roughly linear in steps
            warmup = effective_warmup(config)
            progress = min(1.0, max(0.0, step - warmup) / max(1, total_steps - warmup))
        out.append((step, learning_rate(config, step, progress)))
    return out


# ---------------------------------------------------------------------------- optimiser


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and LayerNorm gains, as in GPT-2).

    The fused implementation does the whole update in one kernel: measured 4–7× faster than the
    plain loop on this CPU, and it exists on CUDA too.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=config.lr, betas=tuple(config.betas))
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # an older torch without fused AdamW on this device
    return torch.optim.AdamW(groups, **kwargs)


# ---------------------------------------------------------------------------- checks


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train, with a message a learner can act on."""

    def bad(message: str):
        raise TrainingError(message)

    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            bad(f"The {name.replace('_', ' ')} must be a number, not {value!r}.")
    if config.lr <= 0:
        bad(f"The learning rate must be above 0 (got {config.lr}); try 1e-3.")
    if config.min_lr < 0 or config.min_lr > config.lr:
        bad(f"The minimum learning rate must be between 0 and the learning rate {config.lr} (got {config.min_lr}).")
    if config.weight_decay < 0 or config.grad_clip < 0:
        bad("Weight decay and gradient clipping cannot be negative.")
    for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "sample_every",
                 "checkpoint_every", "log_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            bad(f"{name.replace('_', ' ').capitalize()} must be a whole number ≥ 1 (got {value!r}).")
    if not isinstance(config.warmup_steps, int) or isinstance(config.warmup_steps, bool) \
            or config.warmup_steps < 0:
        bad(f"Warm-up steps must be a whole number ≥ 0 (got {config.warmup_steps!r}).")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or config.seed < 0:
        bad(f"The seed must be a whole number ≥ 0 (got {config.seed!r}).")
    budgets = [config.max_steps, config.max_minutes, config.max_tokens]
    if all(b is None for b in budgets):
        bad("Give the run a budget: a number of steps, minutes or tokens.")
    for name, value in zip(("steps", "minutes", "tokens"), budgets):
        if value is not None and (not math.isfinite(value) or value <= 0):
            bad(f"The budget of {name} must be above 0 (got {value}).")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        bad(f"AdamW betas must be two numbers in [0, 1) (got {config.betas}).")


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on the device (CUDA) or in the machine (RAM); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_training_memory(model: torch.nn.Module, batch_size: int, seq_len: int) -> int:
    """A rough upper estimate, in bytes, of what one fp32 training step needs.

    Weights, gradients and AdamW's two moments: 4 copies of every parameter. Activations kept for
    the backward pass: per layer about 20 numbers per token per channel plus the attention maps
    (n_head × T × T per sequence, a few copies), and the logits with their gradient (B × T × V).
    """
    n_params = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", None)
    n_layer = getattr(cfg, "n_layer", 1)
    n_embd = getattr(cfg, "n_embd", 0)
    n_head = getattr(cfg, "n_head", 1)
    vocab = getattr(cfg, "vocab_size", 0)
    tokens = batch_size * seq_len
    per_layer = tokens * 20 * n_embd + 3 * batch_size * n_head * seq_len * seq_len
    activations = n_layer * per_layer + 3 * tokens * vocab + 4 * tokens * n_embd
    return 4 * (4 * n_params + activations)


def check_memory(model, batch_size: int, seq_len: int, device: torch.device) -> None:
    need = estimate_training_memory(model, batch_size, seq_len)
    free = available_memory_bytes(device)
    if free is not None and need > 0.8 * free:
        raise TrainingError(
            f"This model and batch need about {need / 2**30:.1f} GiB to train, but only "
            f"{free / 2**30:.1f} GiB is free. Choose a smaller preset, a smaller batch size "
            "(use gradient accumulation to keep the effective batch) or a shorter context."
        )


# ---------------------------------------------------------------------------- distributed


def distributed_context():
    """(rank, world_size), starting the process group if launched by `torchrun`."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def configure_threads() -> int:
    """One thread per physical core, shared out between the processes `torchrun` put on this machine.

    Also tells the C allocator to keep freed memory for the next step (see `device.reuse_freed_memory`).
    """
    from core.lab import device

    device.reuse_freed_memory()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_processes > 1 and not os.environ.get("GLASSBOX_THREADS"):
        return device.configure_threads(max(1, device.physical_cores() // local_processes))
    return device.configure_threads()


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The random stream that draws the batch of `step`: a pure function of (seed, step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


# ---------------------------------------------------------------------------- checkpoints


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases: tied weights (wte = lm_head) are stored once."""
    out, seen = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue  # same storage as an earlier name: the loader re-ties it
        if key is not None:
            seen[key] = name
        out[name] = tensor
    return out


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load weights saved by `model_tensors` (tied aliases may be missing; nothing else may)."""
    result = model.load_state_dict(tensors, strict=False)
    state = model.state_dict()
    ptr_of = {name: t.data_ptr() for name, t in state.items()}
    loaded_ptrs = {ptr_of[n] for n in tensors if n in ptr_of}
    really_missing = [n for n in result.missing_keys if ptr_of.get(n) not in loaded_ptrs]
    if really_missing or result.unexpected_keys:
        raise runs.CorruptRunError(
            "The saved weights do not fit this model "
            f"(missing: {really_missing[:3]}, unexpected: {result.unexpected_keys[:3]})."
        )


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """Optimiser state as flat tensors (for safetensors) plus its JSON part."""
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{slot}"] = value
            else:
                tensors[f"optim.{index}.{slot}"] = torch.tensor(value)
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]}
              for g in state["param_groups"]]
    return tensors, {"param_groups": groups}


def _restore_optimizer(optimizer, tensors: dict, param_groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if not key.startswith("optim."):
            continue
        _, index, slot = key.split(".", 2)
        state.setdefault(int(index), {})[slot] = value
    groups = []
    for g in param_groups:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def _restore_rng(tensors: dict, device: torch.device) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"].to(torch.uint8))
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"].to(torch.uint8), device)


def save_checkpoint(path: Path, model, optimizer, counters: dict, device: torch.device) -> None:
    """Write weights + optimiser + counters so that a crash at any moment leaves one whole checkpoint.

    All three files are first written in full to `checkpoint.next/` (each atomically); only then
    are they moved over the old ones, `train_state.json` last. If a crash interrupts the moves,
    `recover_checkpoint` finishes them on the next start; if it interrupts the writing, the
    half-written folder is discarded and the previous checkpoint is used.
    """
    staging = path / STAGING_DIR
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    step = str(counters["step"])
    optim_tensors, optim_json = _optimizer_tensors(optimizer)
    state_tensors = optim_tensors | _rng_tensors(device)
    runs.save_tensors(staging / "train_state.safetensors", state_tensors, {"step": step})
    runs.save_tensors(staging / "model.safetensors", model_tensors(_unwrap(model)), {"step": step, "format": "pt"})
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
            raise runs.CorruptRunError(
                f"{path / name} is from step {saved_step} but train_state.json says step "
                f"{counters.get('step')}: the checkpoint is inconsistent."
            )
    load_model_tensors(_unwrap(model), {k: v.to(device) for k, v in weights.items()})
    _restore_optimizer(optimizer, state, counters.get("param_groups", []))
    _restore_rng(state, device)
    return counters


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be written again)."""
    if not path.exists():
        return
    rows = runs.read_jsonl(path)
    kept = [r for r in rows if r.get("step", 0) <= last_step]
    if len(kept) == len(rows) and path.read_bytes().endswith(b"\n"):
        return
    import json

    text = "".join(json.dumps(r) + "\n" for r in kept)
    runs.write_bytes_atomic(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------- the loop


class _Sync:
    """What all processes must agree on each step: the mean loss, and rank 0's clock and decisions."""

    def __init__(self, world: int, rank: int, device: torch.device):
        self.world, self.rank, self.device = world, rank, device

    def loss(self, loss: float) -> float:
        if self.world == 1:
            return loss
        import torch.distributed as dist

        t = torch.tensor([loss], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def decisions(self, stop: bool, reached: bool, elapsed: float) -> tuple[bool, bool, float]:
        if self.world == 1:
            return stop, reached, elapsed
        import torch.distributed as dist

        t = torch.tensor([float(stop), float(reached), elapsed], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t[0].item()), bool(t[1].item()), t[2].item()


def train(run_id: str, model: torch.nn.Module, task: TrainTask, config: TrainConfig,
          resume: bool = False, device: torch.device | None = None,
          progress: Callable[[dict], None] | None = None) -> dict:
    """Train `model` on `task` within `config`'s budget, writing into the run `run_id`.

    Returns a summary: steps, tokens, train_loss, val_loss, tokens_per_s, seconds, stopped
    (and whatever else the last evaluation reported, e.g. val_accuracy).
    """
    from core.lab.device import pick_device

    check_config(config)
    task.check(config)
    configure_threads()
    rank, world = distributed_context()
    if device is None:
        device = pick_device()
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if config.batch_size % world:
        raise TrainingError(
            f"A batch of {config.batch_size} sequences cannot be split evenly over {world} processes."
        )
    is_writer = rank == 0
    path = runs.run_dir(run_id)
    if is_writer:
        path.mkdir(parents=True, exist_ok=True)
    task.prepare(config, device)
    # Check memory before anything big is allocated, from the shape of a real batch.
    probe, _ = task.get_batch("train", 0, config.batch_size, batch_generator(config.seed, 0))
    seq_len = probe.shape[-1] if probe.dim() > 1 else 1
    check_memory(model, config.batch_size, seq_len, device)
    model.to(device)

    counters = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    optimizer = None  # a fresh run builds AdamW after its first loss is logged (see _Loop.run)
    if resume:
        optimizer = make_optimizer(model, config, device)
        loaded = load_checkpoint(path, model, optimizer, device)
        if loaded:
            counters = {k: loaded[k] for k in ("step", "tokens", "elapsed_s")}
            counters["last_eval"] = loaded.get("last_eval") or {}
    if not counters["step"]:
        torch.manual_seed(config.seed)  # dropout and sampling noise are reproducible
    if is_writer:
        _truncate_log(path / "metrics.jsonl", counters["step"])
        _truncate_log(path / "samples.jsonl", counters["step"])

    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loop = _Loop(run_id, path, model, train_model, task, config, optimizer, device,
                 rank, world, counters, progress)
    return loop.run()


class _Loop:
    """The state of one training session (one `train` call); `run` is the loop itself."""

    def __init__(self, run_id, path, model, train_model, task, config, optimizer, device,
                 rank, world, counters, progress):
        self.run_id, self.path = run_id, path
        self.model, self.train_model, self.task, self.config = model, train_model, task, config
        self.optimizer, self.device, self.rank, self.world = optimizer, device, rank, world
        self.is_writer = rank == 0
        self.step = int(counters["step"])
        self.tokens = int(counters["tokens"])
        self.elapsed_before = float(counters["elapsed_s"])
        self.last_eval: dict = dict(counters.get("last_eval") or {})
        self.progress = progress
        self.sync = _Sync(world, rank, device)
        self.checkpoint_step = self.step if self.step else None
        self.eval_seconds = 0.0  # time the last evaluation took: kept back from a minutes budget
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()

    # -- clocks and budgets
    def elapsed(self) -> float:
        return self.elapsed_before + (time.perf_counter() - self.t0)

    def budget_reached(self, elapsed: float) -> bool:
        c = self.config
        return bool(
            (c.max_steps and self.step >= c.max_steps)
            or (c.max_tokens and self.tokens >= c.max_tokens)
            or (c.max_minutes and elapsed + self.eval_seconds >= c.max_minutes * 60)
        )

    # -- one optimiser step over grad_accum micro-batches, this rank's slice of the global batch
    def train_step(self, lr: float) -> float:
        c = self.config
        inputs, targets = self.task.get_batch("train", self.step, c.global_batch,
                                              batch_generator(c.seed, self.step))
        per_rank = c.global_batch // self.world
        lo = self.rank * per_rank
        inputs, targets = inputs[lo:lo + per_rank], targets[lo:lo + per_rank]
        micro = per_rank // c.grad_accum if per_rank >= c.grad_accum else per_rank
        total = 0.0
        pieces = range(0, per_rank, micro)
        for i, start in enumerate(pieces):
            x = inputs[start:start + micro].to(self.device, non_blocking=True)
            y = targets[start:start + micro].to(self.device, non_blocking=True)
            last = i == len(pieces) - 1
            sync_ctx = self.train_model.no_sync() if (self.world > 1 and not last) else _null()
            with sync_ctx:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    loss = self.task.loss(self.train_model, x, y) / len(pieces)
                loss.backward()
            total += loss.item()
            self.tokens += self.task.tokens_in_batch(x) * self.world
        return total

    def finish_step(self, loss: float, lr: float) -> bool:
        """Clip and apply the update unless the loss or gradients are not finite."""
        if not math.isfinite(loss):
            return False
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.model, self.config, self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            if not torch.isfinite(norm):
                return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # -- evaluation, samples, logs, checkpoints
    def evaluate(self) -> dict:
        t = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            result = {k: float(v) for k, v in (self.task.evaluate(self.model) or {}).items()}
        self.model.train()
        self.eval_seconds = time.perf_counter() - t
        self.last_eval = result
        return result

    def write_sample(self, elapsed: float) -> None:
        self.model.eval()
        # A private random stream: sampling must not shift the training run's randomness.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed + self.step)
            with torch.no_grad():
                text = self.task.sample(self.model)
        self.model.train()
        if text is not None:
            record = {"step": self.step, "tokens": self.tokens, "elapsed_s": round(elapsed, 3), "text": text}
            runs.append_jsonl(self.path / "samples.jsonl", record)
            if self.progress:
                self.progress({"sample": text, "step": self.step})

    def record(self, step, train_loss, lr, window_t, window_tokens, elapsed) -> dict:
        seconds = max(1e-9, time.perf_counter() - window_t)
        return {"step": step, "tokens": self.tokens, "train_loss": round(train_loss, 5), "lr": lr,
                "tokens_per_s": round((self.tokens - window_tokens) / seconds, 1),
                "elapsed_s": round(elapsed, 3)}

    def log(self, record: dict) -> None:
        runs.append_jsonl(self.path / "metrics.jsonl", record)
        if self.progress:
            self.progress(record)

    def checkpoint(self, elapsed: float) -> None:
        if self.optimizer is None:  # stopped before the first update
            self.optimizer = make_optimizer(self.model, self.config, self.device)
        counters = {"step": self.step, "tokens": self.tokens, "elapsed_s": elapsed,
                    "last_eval": self.last_eval, "world_size": self.world,
                    "config": self.config.to_dict()}
        try:
            save_checkpoint(self.path, self.model, self.optimizer, counters, self.device)
        except OSError as e:
            kept = (f"the checkpoint from step {self.checkpoint_step} is kept"
                    if self.checkpoint_step else "no earlier checkpoint existed")
            raise TrainingError(
                f"Could not save a checkpoint at step {self.step} ({e.strerror or e}); {kept}. "
                "Free some disk space and resume."
            ) from None
        self.checkpoint_step = self.step

    def nan_error(self) -> TrainingError:
        if self.checkpoint_step:
            kept = f"The last good checkpoint (step {self.checkpoint_step}) is kept; resume from it with a lower learning rate."
        else:
            kept = "No checkpoint had been saved yet; start again with a lower learning rate."
        return TrainingError(f"The loss became NaN (not a number) at step {self.step + 1}: training "
                             f"diverged, so it stopped. {kept}")

    def summary(self, train_loss: float | None, elapsed: float, stopped: bool) -> dict:
        session_tokens = self.tokens - self.tokens_at_start
        session_time = max(1e-9, time.perf_counter() - self.t0)
        out = {"steps": self.step, "tokens": self.tokens, "train_loss": train_loss,
               "val_loss": self.last_eval.get("val_loss"),
               "tokens_per_s": round(session_tokens / session_time, 1),
               "seconds": round(elapsed, 2), "stopped": stopped}
        for k, v in self.last_eval.items():
            out.setdefault(k, v)
        return out

    def run(self) -> dict:
        c = self.config
        self.t0 = time.perf_counter()
        self.tokens_at_start = self.tokens
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        window_loss, window_steps = 0.0, 0
        window_t, window_tokens = self.t0, self.tokens
        train_loss = None
        elapsed = self.elapsed()
        while True:
            elapsed = self.elapsed()
            stop = self.is_writer and runs.stop_requested(self.run_id)
            stop, reached, elapsed = self.sync.decisions(stop, self.budget_reached(elapsed), elapsed)
            if stop:
                if self.is_writer:
                    self.checkpoint(elapsed)
                return self.summary(train_loss, elapsed, stopped=True)
            if reached:
                break

            lr = learning_rate(c, self.step, budget_progress(c, self.step, self.tokens, elapsed, self.eval_seconds))
            try:
                loss = self.train_step(lr)
            except KeyboardInterrupt:  # Ctrl-C on the command line: keep the work done so far
                self.model.zero_grad(set_to_none=True)
                if self.is_writer:
                    self.checkpoint(self.elapsed())
                return self.summary(train_loss, self.elapsed(), stopped=True)
            loss = self.sync.loss(loss)
            if self.step == 0 and self.is_writer and math.isfinite(loss):
                # The learner's first point, logged before AdamW is built (building it imports
                # torch's compiler machinery: a second or more on a small CPU).
                self.log(self.record(1, loss, lr, window_t, window_tokens, self.elapsed()))
                window_t, window_tokens = time.perf_counter(), self.tokens
            if not self.finish_step(loss, lr):
                raise self.nan_error()
            self.step += 1
            window_loss += loss
            window_steps += 1

            elapsed = self.elapsed()
            done = self.budget_reached(elapsed)
            at_eval = self.step % c.eval_every == 0 or done
            if self.step == 1 and window_t != self.t0:  # step 1 was logged above
                train_loss = loss
                window_loss, window_steps = 0.0, 0
                if at_eval and self.is_writer:
                    self.log({"step": 1, "tokens": self.tokens, **self.evaluate(),
                              "elapsed_s": round(self.elapsed(), 3)})
            elif self.step % c.log_every == 0 or at_eval or self.step == 1:
                train_loss = window_loss / window_steps
                record = self.record(self.step, train_loss, lr, window_t, window_tokens, elapsed)
                if at_eval and self.is_writer:
                    record.update(self.evaluate())
                    record["elapsed_s"] = round(self.elapsed(), 3)
                if self.is_writer:
                    self.log(record)
                window_loss, window_steps = 0.0, 0
                window_t, window_tokens = time.perf_counter(), self.tokens
            if self.is_writer and (self.step == 1 or self.step % c.sample_every == 0 or done):
                self.write_sample(self.elapsed())
            if self.is_writer and (self.step % c.checkpoint_every == 0 or done):
                self.checkpoint(self.elapsed())

        elapsed = self.elapsed()
        if self.is_writer and self.checkpoint_step != self.step:
            self.checkpoint(elapsed)  # the budget was already reached when this session began
        return self.summary(train_loss, elapsed, stopped=False)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------- for the page


def downsample(rows: list[dict], limit: int = 500) -> list[dict]:
    """At most about `limit` rows, evenly spread, always keeping the last (long runs stay light)."""
    if len(rows) <= limit:
        return rows
    stride = math.ceil(len(rows) / limit)
    kept = rows[::stride]
    return kept if kept[-1] is rows[-1] else kept + rows[-1:]


def progress_summary(metrics: list[dict], train_config: dict | None) -> dict:
    """Where a run stands, from its metrics rows: the figures above the live chart.

    Returns step, tokens, elapsed_s, tokens_per_s (recent), train_loss, val_loss (latest),
    fraction (0–1 of the budget, or None) and eta_s (seconds left, or None).
    """
    rows = [m for m in metrics if "train_loss" in m]
    if not rows:
        return {"step": 0, "tokens": 0, "elapsed_s": 0.0, "tokens_per_s": None, "train_loss": None,
                "val_loss": None, "fraction": 0.0, "eta_s": None}
    last = rows[-1]
    vals = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
    step, tokens, elapsed = last["step"], last.get("tokens", 0), last.get("elapsed_s", 0.0)
    fractions = []
    c = train_config or {}
    if c.get("max_steps"):
        fractions.append(step / c["max_steps"])
    if c.get("max_tokens"):
        fractions.append(tokens / c["max_tokens"])
    if c.get("max_minutes"):
        fractions.append(elapsed / (c["max_minutes"] * 60))
    fraction = min(1.0, max(fractions)) if fractions else None
    eta = None
    if fraction and elapsed > 0:
        eta = max(0.0, elapsed * (1 - fraction) / fraction)
    return {"step": step, "tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": last.get("tokens_per_s"),
            "train_loss": last["train_loss"], "val_loss": vals[-1] if vals else None,
            "fraction": fraction, "eta_s": eta}
