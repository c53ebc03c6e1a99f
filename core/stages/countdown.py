"""`python -m core countdown --steps N --run-id ID` (internal): the smallest resumable job.

It counts, one step every `--delay` seconds, logging each step to metrics.jsonl and saving its
counter as a checkpoint every few steps and on stop. The tests use it to check the job machinery
(start, progress, stop, checkpoint, resume, queueing, crashes) without training a model.
"""

import time
from dataclasses import dataclass

import torch

from core.gpt.errors import GlassBoxError
from core.lab import jobs, runs
from core.lab.cli import option

COMMAND = "countdown"


@dataclass
class Settings:
    steps: int = option(50, help="steps to count")
    delay: float = option(0.1, help="seconds per step")
    checkpoint_every: int = option(5, help="steps between checkpoints")
    run_id: str | None = option(None, help="the run to write (required)")
    resume: bool = option(False, help="continue from the checkpoint")

    def __post_init__(self):
        if not self.run_id:
            raise GlassBoxError("countdown needs --run-id.")


def start(settings: Settings, run_id: str, owner: str | None = None):
    return jobs.start_stage(COMMAND, settings, run_id, owner=owner)


def run(args: Settings, progress=None) -> dict:
    run = runs.create_run(args.run_id, "pretrain", {"command": "countdown"}, resume=args.resume)
    checkpoint = run.path / "model.safetensors"
    step = int(runs.load_tensors(checkpoint)["step"].item()) if args.resume and checkpoint.exists() else 0
    stopped = False
    while step < args.steps:
        if runs.stop_requested(args.run_id):
            stopped = True
            break
        time.sleep(args.delay)
        step += 1
        runs.append_jsonl(run.path / "metrics.jsonl", {"step": step, "train_loss": 1.0 / step})
        if step % args.checkpoint_every == 0:
            runs.save_tensors(checkpoint, {"step": torch.tensor(step)})
    runs.save_tensors(checkpoint, {"step": torch.tensor(step)})
    return {"run_id": args.run_id, "steps": step, "stopped": stopped}
