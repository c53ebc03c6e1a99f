"""Stage 4: pre-train a GPT on a corpus — the model learns to predict the next token.

    python -m core pretrain --data tinyshakespeare --tokenizer char --preset small --run-id shakespeare
    python -m core pretrain --data the-verdict --tokenizer my-bpe --preset base --minutes 5 --run-id verdict
    torchrun --nproc_per_node=2 -m core pretrain ... # data parallel: same result, N processes

Progress goes to stderr; the last line of stdout is one JSON object with run_id, steps, tokens,
train_loss, val_loss, tokens_per_s and seconds. `--resume` continues a stopped run exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.gpt import health
from core.gpt.errors import GlassBoxError, TrainingError
from core.gpt.model import GPT, PRESETS, GPTConfig, count_parameters, preset_config
from core.gpt.pretrain import LanguageModelTask, default_tokenizer, encode_corpus, recipe
from core.gpt.train import TrainConfig, batch_generator, budget_progress, effective_warmup, learning_rate, train_step
from core.lab import data, device as devices, jobs, references, runs, snapshots
from core.lab.cli import option
from core.lab.models import save_model_run
from core.lab.tokenizer_files import load_tokenizer, tokenizer_from_spec
from core.lab.training import run_world, train

COMMAND = "pretrain"
_T_START = time.perf_counter()

# Settings field → TrainConfig field (None means "take the preset's recipe, then TrainConfig's default").
TRAIN_OPTIONS = {
    "steps": "max_steps", "minutes": "max_minutes", "tokens": "max_tokens",
    "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "min_lr": "min_lr",
    "warmup": "warmup_steps", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
    "eval_every": "eval_every", "eval_batches": "eval_batches", "sample_every": "sample_every",
    "checkpoint_every": "checkpoint_every", "log_every": "log_every", "seed": "seed",
}
BUDGETS = ("max_steps", "max_minutes", "max_tokens")
MODEL_OPTIONS = ("context_length", "n_layer", "n_embd", "n_head", "dropout")
TRAINABLE_PRESETS = [name for name, p in PRESETS.items() if "vocab_size" not in p]  # not GPT-2's shapes


@dataclass
class Settings:
    data: str = option("tinyshakespeare", help="corpus: a data source name (tinyshakespeare, the-verdict, "
                                               "python-docs, upload:NAME, file:PATH)")
    tokenizer: str | None = option(None, help="char, word, gpt2, bpe[:N], or the id of a stage-1 tokeniser run "
                                              "(default: char, or bpe:1000 for the base preset)")
    preset: str = option("small", help="model preset: tiny, small, base, ...")
    context_length: int | None = option(None, help="override the preset's context length")
    n_layer: int | None = option(None, help="override the preset's number of blocks")
    n_embd: int | None = option(None, help="override the preset's embedding size")
    n_head: int | None = option(None, help="override the preset's number of heads")
    dropout: float | None = option(None, help="override the preset's dropout")
    val_fraction: float = option(0.1, help="share of the corpus held out (default 0.1)")
    steps: int | None = option(None, help="optimiser steps (default: the preset's recipe)")
    minutes: float | None = option(None, help="wall-clock minutes (the cosine ends with them)")
    tokens: int | None = option(None, help="training tokens")
    batch_size: int | None = option(None, help="sequences per micro-batch")
    grad_accum: int | None = option(None, help="micro-batches per optimiser step")
    lr: float | None = option(None, help="peak learning rate")
    min_lr: float | None = option(None, help="learning rate at the end of the cosine")
    warmup: int | None = option(None, help="warm-up steps")
    weight_decay: float | None = option(None)
    beta2: float | None = option(None, help="AdamW's second-moment decay (0.95 or 0.99)")
    grad_clip: float | None = option(None, help="clip the gradient norm (0: off)")
    seed: int | None = option(None)
    eval_every: int | None = option(None, help="steps between validation losses")
    eval_batches: int | None = option(None, help="batches of fixed validation windows")
    sample_every: int | None = option(None, help="steps between text samples")
    checkpoint_every: int | None = option(None, help="steps between checkpoints")
    log_every: int | None = option(None, help="steps between metrics rows")
    sample_prompt: str = option("\n", help="text the samples start from")
    sample_tokens: int = option(200)
    snapshot_mb: float = option(snapshots.DEFAULT_BUDGET_MB,
                                help="disk budget for the run's fp16 weight snapshots, MB (0: none)")
    device: str | None = option(None, help="cpu, cuda, mps (default: the best available)")
    run_id: str | None = option(None, help="name of the run (default: pretrain-<date>-<time>)")
    resume: bool = option(False, help="continue a stopped run from its checkpoint")
    quiet: bool = option(False, help="no progress on stderr")

    def __post_init__(self):
        if not isinstance(self.snapshot_mb, (int, float)) or not math.isfinite(self.snapshot_mb) \
                or self.snapshot_mb < 0:
            raise TrainingError(f"The snapshot budget must be a number of MB ≥ 0 (got {self.snapshot_mb!r}).")


def _say(settings: Settings, text: str) -> None:
    if not settings.quiet and run_world()[0] == 0:
        print(text, file=sys.stderr, flush=True)


def print_progress(record: dict) -> None:
    """The command line's progress line on stderr (`--quiet` turns it off)."""
    if "sample" in record:
        first = record["sample"].strip().splitlines()[:2]
        print(f"  sample @ {record['step']}: {' / '.join(first)[:100]!r}", file=sys.stderr, flush=True)
        return
    if "train_loss" not in record:
        return
    line = (f"step {record['step']:>6} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['tokens_per_s']:>9,.0f} tok/s | {record['elapsed_s']:7.1f} s")
    if "val_loss" in record:
        line += f" | val {record['val_loss']:.4f}"
    print(line, file=sys.stderr, flush=True)


def train_config_from(settings: Settings, preset: str, stored: dict | None = None) -> TrainConfig:
    """Recipe of the preset, then a stored config (when resuming), then what the user typed."""
    values = recipe(preset)
    if stored:
        values.update(stored)
    given = {field: getattr(settings, opt) for opt, field in TRAIN_OPTIONS.items() if getattr(settings, opt) is not None}
    if any(b in given for b in BUDGETS):  # a budget typed now replaces the recipe's budget
        for b in BUDGETS:
            values[b] = None
    values.update(given)
    if settings.beta2 is not None:
        values["betas"] = (tuple(values.get("betas") or (0.9, 0.95))[0], settings.beta2)
    return TrainConfig.from_dict(values)


def _prepare(settings: Settings, run_id: str, stored: dict | None):
    """Corpus, tokeniser, model config and training config: the run's own when resuming."""
    data_name = stored["data"] if stored else settings.data
    text = data.read_text(data_name)
    if stored:  # the run's own tokeniser and model shape, whatever the command line says
        tokenizer = load_tokenizer(runs.run_dir(run_id) / "tokenizer.json")
        model_config = GPTConfig.from_dict(stored["model"])
        config = train_config_from(settings, stored.get("preset", "small"), stored.get("train"))
        return data_name, text, tokenizer, stored["tokenizer"], stored.get("preset"), stored["val_fraction"], \
            model_config, config
    spec = settings.tokenizer or default_tokenizer(settings.preset)
    tokenizer = tokenizer_from_spec(spec, text)
    overrides = {k: getattr(settings, k) for k in MODEL_OPTIONS if getattr(settings, k) is not None}
    model_config = preset_config(settings.preset, tokenizer.vocab_size, **overrides)
    return data_name, text, tokenizer, spec, settings.preset, settings.val_fraction, model_config, \
        train_config_from(settings, settings.preset)


def run(settings: Settings, progress=print_progress) -> dict:
    """Pre-train (or resume) one run; the only code that writes a pre-training run."""
    devices.configure_training_threads()
    rank, world = run_world()
    run_id = runs.validate_run_id(settings.run_id) if settings.run_id else runs.new_run_id("pretrain")
    path = runs.run_dir(run_id)
    stored = None
    if settings.resume and (path / "config.json").exists():
        stored = runs.open_run(run_id).config
        if stored.get("stage") != "pretrain":
            raise TrainingError(f"Run {run_id!r} is a {stored.get('stage')} run, not a pre-training run.")
    data_name, text, tokenizer, spec, preset, val_fraction, model_config, config = _prepare(settings, run_id, stored)
    corpus_sha256 = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    if stored and stored.get("data_sha256") not in (None, corpus_sha256):
        # On a shared server an upload can be replaced between stop and resume: training on a
        # different text would silently mix two corpora in one run.
        raise TrainingError(f"The corpus {data_name!r} has changed since run {run_id!r} started (sha256 "
                            f"{stored['data_sha256'][:12]}…, now {corpus_sha256[:12]}…): resuming would train "
                            "on a different text. Start a new run instead.")
    cache_dir = None
    if spec not in ("char", "word", "gpt2") and not spec.startswith("bpe"):
        cache_dir = runs.run_dir(spec)  # a stage-1 run: keep its encoded corpora there
    ids = encode_cached(tokenizer, text, cache_dir)
    task = LanguageModelTask(ids, model_config.context_length, val_fraction, tokenizer=tokenizer,
                             sample_prompt=settings.sample_prompt, sample_tokens=settings.sample_tokens)
    torch.manual_seed(config.seed)  # the same initial weights on every process, every time
    model = GPT(model_config)
    budget = (stored.get("snapshots") or {}).get("budget_bytes") if stored else None
    plan = snapshots.Plan(int(settings.snapshot_mb * 2**20) if budget is None else budget, model)
    _say(settings, f"run {run_id}: {model.num_parameters():,} parameters, vocabulary {tokenizer.vocab_size}, "
                   f"{len(ids):,} tokens of {data_name}, device {devices.pick_device(settings.device).type}")
    check = _device_check(settings, model, task, config)
    if rank == 0:
        snap = {"budget_bytes": plan.budget_bytes, "bytes_per_snapshot": plan.one,
                "probe": text[int(len(text) * (1 - val_fraction)):][:400]}
        if stored:
            runs.update_config(run_id, train=config.to_dict(), snapshots=snap)
        else:
            runs.create_run(run_id, "pretrain", {
                "data": data_name, "data_sha256": corpus_sha256, "tokenizer": spec, "tokenizer_kind": tokenizer.kind,
                "vocab_size": tokenizer.vocab_size, "preset": preset, "val_fraction": val_fraction,
                "corpus_tokens": len(ids), "model": model_config.to_dict(), "train": config.to_dict(),
                "world_size": world, "snapshots": snap}, parent=spec if cache_dir is not None else None)
            save_model_run(run_id, model, tokenizer)  # loadable at once, even before the first checkpoint
        if check is not None:
            runs.update_config(run_id, device_check=check)
    device = devices.pick_device(settings.device) if settings.device else None
    result = train(run_id, model, task, config, resume=settings.resume, device=device,
                   progress=None if settings.quiet else progress, snapshot_plan=plan)
    if rank != 0:  # every process returns; only rank 0 reports (its JSON is the last line)
        sys.stdout = open(os.devnull, "w")
    else:
        runs.update_config(run_id, disk_bytes=disk_bytes(path))
    return {"run_id": run_id, **result, "parameters": model.num_parameters(),
            "wall_s": round(time.perf_counter() - _T_START, 2)}


_ENCODED: dict[str, torch.Tensor] = {}  # in-memory cache: the same corpus is encoded once per process


def encode_cached(tokenizer, text: str, cache_dir: Path | None = None) -> torch.Tensor:
    """`encode_corpus`, kept in memory and, when `cache_dir` is given (a stage-1 tokeniser run), on
    disk as safetensors: encoding a megabyte with a BPE tokeniser takes a while."""
    tokenizer_json = json.dumps(tokenizer.to_dict(), sort_keys=True)
    key = hashlib.sha256(tokenizer_json.encode() + b"\0" + text.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    if key in _ENCODED:
        return _ENCODED[key]
    cache_file = Path(cache_dir) / f"encoded-{key}.safetensors" if cache_dir else None
    ids = None
    if cache_file is not None and cache_file.is_file():
        try:
            ids = runs.load_tensors(cache_file)["ids"].long()
        except (GlassBoxError, KeyError):  # a damaged cache is just recomputed
            ids = None
    if ids is None:
        ids = encode_corpus(tokenizer, text)
        if cache_file is not None:
            try:
                runs.save_tensors(cache_file, {"ids": ids.to(torch.int32)})
            except OSError:
                pass  # a read-only or full disk: the cache is only an optimisation
    _ENCODED.clear()  # keep one corpus in memory, not every one ever seen
    _ENCODED[key] = ids
    return ids


def _device_check(settings: Settings, model, task, config: TrainConfig) -> dict | None:
    """Before training on a GPU or MPS: one batch on the device and on the CPU must give one loss."""
    device = devices.pick_device(settings.device)
    if device.type == "cpu":
        return None
    inputs, targets = task.get_batch("train", 0, min(8, config.batch_size), batch_generator(config.seed, 0))
    check = health.device_check(model, inputs, targets, device)
    message = health.device_message(check)
    if message:
        _say(settings, "warning: " + message)
    return check


def disk_bytes(path) -> int:
    """Bytes a run takes on disk (weights, checkpoint, snapshots, logs)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def start(settings: Settings, run_id: str, owner: str | None = None):
    """Start pre-training as a background job (what page 4's button does)."""
    return jobs.start_stage(COMMAND, settings, run_id, owner=owner)


# ---------------------------------------------------------------------------- what page 4 reads


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
    c = train_config or {}
    fractions = [v for v in ((step / c["max_steps"]) if c.get("max_steps") else None,
                             (tokens / c["max_tokens"]) if c.get("max_tokens") else None,
                             (elapsed / (c["max_minutes"] * 60)) if c.get("max_minutes") else None) if v is not None]
    fraction = min(1.0, max(fractions)) if fractions else None
    eta = max(0.0, elapsed * (1 - fraction) / fraction) if fraction and elapsed > 0 else None
    return {"step": step, "tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": last.get("tokens_per_s"),
            "train_loss": last["train_loss"], "val_loss": vals[-1] if vals else None,
            "fraction": fraction, "eta_s": eta}


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


def results(run_id: str) -> dict:
    """A pre-training run as page 4 draws it: config, state, metrics, samples and the summary."""
    run = runs.open_run(run_id)
    metrics = run.metrics()
    expected = references.expected_vs_yours(run.config, metrics, "pretrain")
    check = run.config.get("device_check")
    return {"run_id": run_id, "config": run.config, "state": run.state, "status": run.status,
            "metrics": metrics, "samples": run.samples(),
            "summary": progress_summary(metrics, run.config.get("train")), "reference": expected["reference"],
            "reference_band": expected["band"], "health": expected["health"],
            "device_message": health.device_message(check) if check else None}


def run_ids() -> list[str]:
    """Pre-training runs on disk, newest first (unreadable ones left out)."""
    return [r.id for r in runs.list_runs("pretrain") if not r.error]


def corpora(owner: str | None = None, everyone: bool = True) -> list[str]:
    """Text sources on this machine (python-docs is always there); `owner`'s uploads first."""
    try:
        names = [s["name"] for s in data.list_sources(owner, everyone)
                 if s.get("kind") == "text" and (s.get("available") or s["name"] == "python-docs")]
    except GlassBoxError:
        names = []
    return names or ["python-docs"]


def tokenizer_choices() -> dict[str, str]:
    """Tokeniser spec → label: built-in ones, then the stage-1 runs."""
    labels = {"char": "characters (trained on the corpus, ~65 tokens)",
              "bpe:1000": "our BPE, 1,000 tokens (trained on the corpus when the job starts)",
              "gpt2": "GPT-2's 50,257 tokens (slow to train from scratch)"}
    for r in runs.list_runs("tokenizer"):
        if not r.error:
            labels[r.id] = (f"stage-1 run {r.id} ({r.config.get('tokenizer', '?')}, "
                            f"{r.config.get('vocab_size', '?')} tokens, from {r.config.get('data', '?')})")
    return labels


def preset_summary(preset: str, tokenizer: str) -> dict:
    """The preset's shape and its parameter count with this tokeniser's (guessed) vocabulary."""
    shape = dict(PRESETS[preset])
    vocab = {"char": 65, "bpe:1000": 1000, "gpt2": 50257}.get(tokenizer)
    if vocab is None:
        found = [r for r in runs.list_runs("tokenizer") if r.id == tokenizer and not r.error]
        vocab = found[0].config.get("vocab_size", 1000) if found else 1000
    try:
        shape["parameters"] = sum(count_parameters(preset_config(preset, vocab)).values())
    except GlassBoxError:
        shape["parameters"] = None
    return shape


CODE = {"loss curve": (train_step,), "learning rate": (learning_rate, budget_progress),
        "task": (LanguageModelTask.get_batch, LanguageModelTask.evaluate)}
