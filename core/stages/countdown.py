"""`python -m core countdown --steps N --run-id ID` (internal): the smallest resumable job.

It counts, one step every `--delay` seconds, logging each step to metrics.jsonl and saving its
counter as a checkpoint every few steps and on stop. The tests use it to check the job machinery
(start, progress, stop, checkpoint, resume, queueing, crashes) without training a model.
"""

import time

import torch

from core.lab import runs


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--resume", action="store_true")


def run(args) -> dict:
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
