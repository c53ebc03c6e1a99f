"""`python -m core classify` — stage 5 on its own: fine-tune a language model to tell spam from ham.

    python -m core classify --from my-pretrain-run --data sms-spam --minutes 3 --run-id spam-1
    python -m core classify --from random:my-pretrain-run --steps 300 --run-id spam-random

Prints progress on stderr and, as the last line of stdout, the headline figures:
run_id, train/val/test accuracy (0–1) and loss, seconds.
"""

import sys

# Kept here (and checked against core.gpt.classify by a test) so that `--help` and argument
# errors answer at once, without importing torch.
FREEZE_MODES = ("head", "last-block", "all")
DEFAULT_FREEZE = "last-block"
DEFAULT_STEPS = 300


def add_arguments(parser):
    parser.add_argument("--from", dest="start", metavar="RUN",
                        help="run to start from: a stage-4 'pretrain' run or an imported GPT-2; "
                             "'random:RUN' = RUN's architecture and tokeniser with random weights")
    parser.add_argument("--data", default="sms-spam", help="labelled SMS data (default: sms-spam)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help=f"optimiser steps (default {DEFAULT_STEPS})")
    budget.add_argument("--minutes", type=float, help="train for this many minutes")
    parser.add_argument("--freeze", choices=FREEZE_MODES, default=DEFAULT_FREEZE,
                        help="what learns: head | last-block (head + last block + final norm) | all")
    parser.add_argument("--random-init", action="store_true",
                        help="start from random weights (same shape and tokeniser as --from)")
    parser.add_argument("--max-length", type=int,
                        help="pad/truncate messages to this many tokens "
                             "(default: longest training message, at most the context length)")
    parser.add_argument("--batch-size", type=int, default=None, help="messages per step (default 16)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 40)")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: the best available)")
    parser.add_argument("--run-id", default=None, help="name of the new run (default: classify-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run from its checkpoint")


def _progress(record: dict) -> None:
    if "train_loss" not in record:
        return
    line = f"step {record['step']:>5}  loss {record['train_loss']:.4f}"
    if "val_accuracy" in record:
        line += (f"  val loss {record['val_loss']:.4f}  val acc {record['val_accuracy']:.1%}"
                 f"  train acc {record['train_accuracy']:.1%}")
    print(line, file=sys.stderr, flush=True)


def run(args) -> dict:
    from core.lab import runs
    from core.gpt import classify as C

    run_id = args.run_id or runs.new_run_id("classify")
    if not args.resume and not args.start:
        raise C.ClassifyError("Name the run to start from with --from RUN (see `python -m core classify --help`).")
    given = dict(max_steps=args.steps, max_minutes=args.minutes, batch_size=args.batch_size,
                 lr=args.lr, eval_every=args.eval_every)
    config = None  # resuming with nothing new: the run keeps its stored settings
    if not args.resume or any(v is not None for v in given.values()):
        config = C.default_train_config(**given)
        if args.lr is not None:
            config.min_lr = min(config.min_lr, args.lr / 10)
    device = None
    if args.device:
        import torch

        device = torch.device(args.device)
    result = C.fine_tune(run_id, args.start, data_source=args.data, freeze=args.freeze,
                         random_init=args.random_init, max_length=args.max_length,
                         train_config=config, resume=args.resume, device=device, progress=_progress)
    return result
