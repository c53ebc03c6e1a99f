"""`python -m core instruct`: stage 6 on its own — instruction-tune a pre-trained run.

    python -m core instruct --from my-pretrain --data instruction-data --minutes 10 \
        --run-id my-instruct [--mask-prompt] [--eval-limit 50] [--resume]

Answers the test instructions with the starting model, tunes it, answers them again with the
tuned model, and saves both side by side in `checkpoints/<run-id>/responses.json`. The JSON last
line holds run_id, train_loss, val_loss, format_rate_start, format_rate_tuned and seconds.
"""

import sys

from core.gpt.errors import GlassBoxError


def add_arguments(parser) -> None:
    parser.add_argument("--from", dest="from_run", required=True,
                        help="run to start from: a stage-4 (pretrain) run or an imported GPT-2")
    parser.add_argument("--data", default="instruction-data",
                        help="instruction data: a registry name or file:<path> (JSON records "
                             "{instruction, input, output})")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="number of optimiser steps")
    budget.add_argument("--minutes", type=float, help="wall-clock training budget")
    parser.add_argument("--mask-prompt", action="store_true",
                        help="grade only the answer tokens (the prompt is left out of the loss)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="compare the two models on the first N test instructions only")
    parser.add_argument("--max-new-tokens", type=int, default=96,
                        help="token budget per answer when comparing the models (default 96)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: 1e-3 for small models, 5e-5 for GPT-2 sizes)")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--sample-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--resume", action="store_true", help="continue a stopped run")


def train_config_from_args(args):
    from core.gpt.train import TrainConfig

    if args.steps is None and args.minutes is None:
        args.steps = 200  # a short default that shows the change on a small model
    if args.steps is not None and args.steps < 1:
        raise GlassBoxError("--steps must be at least 1.")
    if args.minutes is not None and args.minutes <= 0:
        raise GlassBoxError("--minutes must be more than 0.")
    if args.batch_size < 1:
        raise GlassBoxError("--batch-size must be at least 1.")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise GlassBoxError("--eval-limit must be at least 1.")
    if args.lr is None:
        from core.gpt.instruct import suggested_lr

        args.lr = suggested_lr(args.from_run)
    return TrainConfig(
        max_steps=args.steps, max_minutes=args.minutes, batch_size=args.batch_size,
        lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup_steps,
        eval_every=args.eval_every, sample_every=args.sample_every,
        checkpoint_every=max(args.eval_every, 100), log_every=5, seed=args.seed,
    )


def describe_progress(message) -> str:
    """One line for stderr: our own messages are text, the training loop sends dicts."""
    if isinstance(message, str):
        return message
    if "sample" in message:
        return f"step {message.get('step')}: answer to the validation instruction: {message['sample']!r}"
    parts = [f"step {message.get('step')}"]
    for key in ("train_loss", "val_loss"):
        if message.get(key) is not None:
            parts.append(f"{key} {message[key]:.3f}")
    if message.get("elapsed_s") is not None:
        parts.append(f"{message['elapsed_s']:.0f}s")
    return "  ".join(parts)


def run(args) -> dict:
    from core.lab.runs import validate_run_id
    from core.gpt.instruct import InstructSettings, run_instruct

    validate_run_id(args.run_id)
    validate_run_id(args.from_run)
    config = train_config_from_args(args)
    settings = InstructSettings(data=args.data, mask_prompt=args.mask_prompt,
                                eval_limit=args.eval_limit, max_new_tokens=args.max_new_tokens)

    def progress(message) -> None:
        print(describe_progress(message), file=sys.stderr, flush=True)

    return run_instruct(args.run_id, args.from_run, settings, config, resume=args.resume,
                        progress=progress)
