"""The textbook's training loop wired to the run store: `train(run_id, model, task, config)`.

`core.gpt.train.train_loop` writes nothing; this module gives it hooks that do (`RunHooks`):

    metrics.jsonl   step, tokens, train_loss, lr, tokens_per_s, elapsed_s (+ val_loss, ...)
    samples.jsonl   step, tokens, elapsed_s, text
    checkpoints     model.safetensors, train_state.safetensors, train_state.json (core.lab.checkpoints)
    snapshots/      fp16 weights at log-spaced steps (core.lab.snapshots)

and answers the Stop button (`runs.stop_requested`). Under `torchrun` every process takes its
own slice of each global batch, DistributedDataParallel averages the gradients, and rank 0 alone
writes; all processes follow rank 0's clock and decisions, so N processes compute what one does.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from core.gpt.errors import TrainingError
from core.gpt.train import TrainConfig, TrainHooks, TrainState, TrainTask, batch_generator, check_config, \
    make_optimizer, train_loop
from core.lab import checkpoints, device as devices, runs, snapshots


class RunHooks(TrainHooks):
    """Hooks that write run `run_id` (rank 0 only) and keep `world` processes in step."""

    def __init__(self, run_id: str, path: Path, model, config: TrainConfig, device: torch.device,
                 rank: int = 0, world: int = 1, progress: Callable[[dict], None] | None = None,
                 snapshot_plan: snapshots.Plan | None = None):
        self.run_id, self.path, self.model, self.config, self.device = run_id, path, model, config, device
        self.rank, self.world, self.progress = rank, world, progress
        self.writer = rank == 0
        self.snapshot_plan = snapshot_plan

    # -- the Stop button and the processes' agreement
    def stop_requested(self, state: TrainState) -> bool:
        return self.writer and runs.stop_requested(self.run_id)

    def agree(self, stop: bool, reached: bool, elapsed: float) -> tuple[bool, bool, float]:
        if self.world == 1:
            return stop, reached, elapsed
        t = torch.tensor([float(stop), float(reached), elapsed], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return bool(t[0].item()), bool(t[1].item()), t[2].item()

    def share(self, inputs, targets):
        per_rank = len(inputs) // self.world
        lo = self.rank * per_rank
        return inputs[lo:lo + per_rank], targets[lo:lo + per_rank]

    def gradient_sync(self, model, last_piece: bool):
        if self.world > 1 and not last_piece:
            return model.no_sync()
        return contextlib.nullcontext()

    def mean_loss(self, loss: float) -> float:
        if self.world == 1:
            return loss
        t = torch.tensor([loss], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    # -- what rank 0 writes
    def log(self, record: dict) -> None:
        if self.writer:
            runs.append_jsonl(self.path / "metrics.jsonl", record)
            if self.progress:
                self.progress(record)

    def sample(self, state: TrainState, text: str, elapsed: float) -> None:
        if self.writer:
            record = {"step": state.step, "tokens": state.tokens, "elapsed_s": round(elapsed, 3), "text": text}
            runs.append_jsonl(self.path / "samples.jsonl", record)
            if self.progress:
                self.progress({"sample": text, "step": state.step})

    def weights_at(self, model, state: TrainState) -> None:
        if self.writer and self.snapshot_plan is not None:
            self.snapshot_plan.maybe_save(self.path, model, state.step)

    def checkpoint(self, state: TrainState, elapsed: float) -> None:
        if not self.writer:
            return
        counters = {"step": state.step, "tokens": state.tokens, "elapsed_s": elapsed,
                    "last_eval": state.last_eval, "world_size": self.world, "config": self.config.to_dict()}
        try:
            checkpoints.save_checkpoint(self.path, self.model, state.optimizer, counters, self.device)
        except OSError as e:
            kept = (f"the checkpoint from step {state.checkpoint_step} is kept"
                    if state.checkpoint_step else "no earlier checkpoint existed")
            raise TrainingError(
                f"Could not save a checkpoint at step {state.step} ({e.strerror or e}); {kept}. "
                "Free some disk space and resume."
            ) from None
        if self.snapshot_plan is not None:  # the newest step is always in the history ("plus the last")
            self.snapshot_plan.save(self.path, self.model, state.step)


def train(run_id: str, model: torch.nn.Module, task: TrainTask, config: TrainConfig,
          resume: bool = False, device: torch.device | None = None,
          progress: Callable[[dict], None] | None = None, snapshot_plan: snapshots.Plan | None = None) -> dict:
    """Train `model` on `task` within `config`'s budget, writing into the run `run_id`.

    Returns a summary: steps, tokens, train_loss, val_loss, tokens_per_s, seconds, stopped
    (and whatever else the last evaluation reported, e.g. val_accuracy).
    """
    check_config(config)
    task.check(config)
    devices.configure_training_threads()
    rank, world = devices.distributed_context()
    device = devices.training_device(device, rank, world)
    if config.batch_size % world:
        raise TrainingError(f"A batch of {config.batch_size} sequences cannot be split evenly over {world} processes.")
    path = runs.run_dir(run_id)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    task.prepare(config, device)
    # Check memory before anything big is allocated, from the shape of a real batch.
    probe, _ = task.get_batch("train", 0, config.batch_size, batch_generator(config.seed, 0))
    devices.check_memory(model, config.batch_size, probe.shape[-1] if probe.dim() > 1 else 1, device)
    model.to(device)
    state = checkpoints.resume_state(path, model, config, device, make_optimizer) if resume else TrainState()
    if not state.step:
        torch.manual_seed(config.seed)  # dropout and sampling noise are reproducible
    if rank == 0:
        checkpoints.truncate_log(path / "metrics.jsonl", state.step)
        checkpoints.truncate_log(path / "samples.jsonl", state.step)
    train_model = model
    if world > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    hooks = RunHooks(run_id, path, model, config, device, rank, world, progress, snapshot_plan)
    return train_loop(train_model, task, config, state, hooks)


def run_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless launched by `torchrun`."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
