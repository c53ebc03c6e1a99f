"""`python -m core pretrain`: stage 4 on the command line — pre-train a GPT on a corpus.

    python -m core pretrain --data tinyshakespeare --tokenizer char --preset small --run-id shakespeare
    python -m core pretrain --data the-verdict --tokenizer my-bpe --preset base --minutes 5 --run-id verdict
    torchrun --nproc_per_node=2 -m core pretrain ... # data parallel: same result, N processes

Progress goes to stderr; the last line of stdout is one JSON object with run_id, steps, tokens,
train_loss, val_loss, tokens_per_s and seconds. `--resume` continues a stopped run exactly.
Torch is imported only inside `run`, so the help and argument errors come back at once.
"""

from __future__ import annotations

import os
import sys
import time

_T_START = time.perf_counter()

# CLI option → TrainConfig field (None means "take the preset's recipe, then TrainConfig's default").
TRAIN_OPTIONS = {
    "steps": "max_steps", "minutes": "max_minutes", "tokens": "max_tokens",
    "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "min_lr": "min_lr",
    "warmup": "warmup_steps", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
    "eval_every": "eval_every", "eval_batches": "eval_batches", "sample_every": "sample_every",
    "checkpoint_every": "checkpoint_every", "log_every": "log_every", "seed": "seed",
}
BUDGETS = ("max_steps", "max_minutes", "max_tokens")
MODEL_OPTIONS = ("context_length", "n_layer", "n_embd", "n_head", "dropout")


def add_arguments(parser) -> None:
    data = parser.add_argument_group("data and model")
    data.add_argument("--data", default="tinyshakespeare",
                      help="corpus: a data source name (tinyshakespeare, the-verdict, python-docs, upload:NAME, file:PATH)")
    data.add_argument("--tokenizer", default=None,
                      help="char, word, gpt2, bpe[:N], or the id of a stage-1 tokeniser run "
                           "(default: char, or bpe:1000 for the base preset)")
    data.add_argument("--preset", default="small", help="model preset: tiny, small, base, ...")
    data.add_argument("--context-length", type=int, help="override the preset's context length")
    data.add_argument("--n-layer", type=int, help="override the preset's number of blocks")
    data.add_argument("--n-embd", type=int, help="override the preset's embedding size")
    data.add_argument("--n-head", type=int, help="override the preset's number of heads")
    data.add_argument("--dropout", type=float, help="override the preset's dropout")
    data.add_argument("--val-fraction", type=float, default=0.1, help="share of the corpus held out (default 0.1)")

    budget = parser.add_argument_group("budget (the first reached ends the run; default: the preset's recipe)")
    budget.add_argument("--steps", type=int, help="optimiser steps")
    budget.add_argument("--minutes", type=float, help="wall-clock minutes (the cosine ends with them)")
    budget.add_argument("--tokens", type=int, help="training tokens")

    opt = parser.add_argument_group("optimisation (defaults: the preset's recipe)")
    opt.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    opt.add_argument("--grad-accum", type=int, help="micro-batches per optimiser step")
    opt.add_argument("--lr", type=float, help="peak learning rate")
    opt.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine")
    opt.add_argument("--warmup", type=int, help="warm-up steps")
    opt.add_argument("--weight-decay", type=float)
    opt.add_argument("--beta2", type=float, help="AdamW's second-moment decay (0.95 or 0.99)")
    opt.add_argument("--grad-clip", type=float, help="clip the gradient norm (0: off)")
    opt.add_argument("--seed", type=int)

    log = parser.add_argument_group("logging")
    log.add_argument("--eval-every", type=int, help="steps between validation losses")
    log.add_argument("--eval-batches", type=int, help="batches of fixed validation windows")
    log.add_argument("--sample-every", type=int, help="steps between text samples")
    log.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    log.add_argument("--log-every", type=int, help="steps between metrics rows")
    log.add_argument("--sample-prompt", default="\n", help="text the samples start from")
    log.add_argument("--sample-tokens", type=int, default=200)

    parser.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--run-id", help="name of the run (default: pretrain-<date>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue a stopped run from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _say(args, text: str) -> None:
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(text, file=sys.stderr, flush=True)


def _progress_printer(args):
    def show(record: dict) -> None:
        if "sample" in record:
            first = record["sample"].strip().splitlines()[:2]
            _say(args, f"  sample @ {record['step']}: {' / '.join(first)[:100]!r}")
            return
        line = (f"step {record['step']:>6} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
                f"{record['tokens_per_s']:>9,.0f} tok/s | {record['elapsed_s']:7.1f} s")
        if "val_loss" in record:
            line += f" | val {record['val_loss']:.4f}"
        _say(args, line)

    return show


def train_config_from_args(args, preset: str, stored: dict | None = None):
    """Recipe of the preset, then a stored config (when resuming), then what the user typed."""
    from core.gpt.pretrain import recipe
    from core.gpt.train import TrainConfig

    values = recipe(preset)
    if stored:
        values.update(stored)
    given = {field: getattr(args, opt) for opt, field in TRAIN_OPTIONS.items() if getattr(args, opt) is not None}
    if any(b in given for b in BUDGETS):  # a budget typed now replaces the recipe's budget
        for b in BUDGETS:
            values[b] = None
    values.update(given)
    if getattr(args, "beta2", None) is not None:
        values["betas"] = (tuple(values.get("betas") or (0.9, 0.95))[0], args.beta2)
    return TrainConfig.from_dict(values)


def run(args) -> dict:
    import torch

    from core.lab import data, runs
    from core.lab.device import pick_device
    from core.gpt.errors import TrainingError
    from core.gpt.model import GPT, GPTConfig, preset_config
    from core.lab.models import save_model_run
    from core.gpt.pretrain import LanguageModelTask, default_tokenizer, encode_corpus
    from core.gpt.tokenizers import load_tokenizer, tokenizer_from_spec
    from core.gpt.train import configure_threads, train

    configure_threads()
    rank = int(os.environ.get("RANK", "0"))
    run_id = runs.validate_run_id(args.run_id) if args.run_id else runs.new_run_id("pretrain")
    path = runs.run_dir(run_id)
    stored = None
    if args.resume and (path / "config.json").exists():
        stored = runs.open_run(run_id).config
        if stored.get("stage") != "pretrain":
            raise TrainingError(f"Run {run_id!r} is a {stored.get('stage')} run, not a pre-training run.")

    data_name = stored["data"] if stored else args.data
    text = data.read_text(data_name)
    if stored:  # the run's own tokeniser and model shape, whatever the command line says
        tokenizer = load_tokenizer(path / "tokenizer.json")
        model_config = GPTConfig.from_dict(stored["model"])
        config = train_config_from_args(args, stored.get("preset", "small"), stored.get("train"))
        tokenizer_spec, preset, val_fraction = stored["tokenizer"], stored.get("preset"), stored["val_fraction"]
    else:
        preset, val_fraction = args.preset, args.val_fraction
        tokenizer_spec = args.tokenizer or default_tokenizer(preset)
        tokenizer = tokenizer_from_spec(tokenizer_spec, text)
        overrides = {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None}
        model_config = preset_config(preset, tokenizer.vocab_size, **overrides)
        config = train_config_from_args(args, preset)

    cache_dir = None
    if tokenizer_spec not in ("char", "word", "gpt2") and not tokenizer_spec.startswith("bpe"):
        cache_dir = runs.run_dir(tokenizer_spec)  # a stage-1 run: keep its encoded corpora there
    ids = encode_corpus(tokenizer, text, cache_dir)
    task = LanguageModelTask(ids, model_config.context_length, val_fraction, tokenizer=tokenizer,
                             sample_prompt=args.sample_prompt, sample_tokens=args.sample_tokens)
    torch.manual_seed(config.seed)  # the same initial weights on every process, every time
    model = GPT(model_config)
    _say(args, f"run {run_id}: {model.num_parameters():,} parameters, vocabulary {tokenizer.vocab_size}, "
               f"{len(ids):,} tokens of {data_name}, device {pick_device(args.device).type}")

    if rank == 0:
        run_config = {
            "data": data_name, "tokenizer": tokenizer_spec, "tokenizer_kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size, "preset": preset, "val_fraction": val_fraction,
            "corpus_tokens": len(ids), "model": model_config.to_dict(), "train": config.to_dict(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }
        parent = tokenizer_spec if cache_dir is not None else None
        if stored:
            runs.update_config(run_id, train=config.to_dict())
        else:
            runs.create_run(run_id, "pretrain", run_config, parent=parent)
            save_model_run(run_id, model, tokenizer)  # loadable at once, even before the first checkpoint

    device = pick_device(args.device) if args.device else None
    result = train(run_id, model, task, config, resume=args.resume, device=device,
                   progress=_progress_printer(args))
    if rank != 0:  # every process returns; only rank 0 reports (its JSON is the last line)
        sys.stdout = open(os.devnull, "w")
    return {"run_id": run_id, **result, "parameters": model.num_parameters(),
            "wall_s": round(time.perf_counter() - _T_START, 2)}
