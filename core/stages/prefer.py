"""Preference tuning (DPO), beyond the seven stages: an instruction-tuned model learns to prefer
the polite answer of each pair over the rude one, against a frozen copy of itself.

    python -m core prefer --from my-instruct --data instruction-data-with-preference \
        --steps 100 --beta 0.1 --run-id my-dpo [--lora-rank 8 [--lora-alpha 16] [--lora-targets qkv,proj,mlp]]

Progress goes to stderr; the last line of stdout is one JSON object with run_id,
reward_accuracy_start, reward_accuracy, reward_margin, val_loss and seconds. `--resume` continues
a stopped run exactly. When training ends, both models (SFT = the start, DPO = the tuned one)
answer held-out test instructions; `responses.json` holds them side by side for the page and for
stage 7 (`python -m core judge --run my-dpo --mode pairwise ...`).
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from core.gpt.errors import GlassBoxError, TrainingError
from core.gpt.chat import template_for
from core.gpt.instruct import format_prompt, require_end_of_text, split_records
from core.gpt.lora import DEFAULT_TARGETS, LoRALinear, add_lora, check_lora_settings, lora_disabled, \
    trainable_parameters
from core.gpt.prefer import DPOTask, answer, check_beta, dpo_loss, parse_preference_records, reference_copy, \
    sequence_logprobs
from core.gpt.train import TrainConfig
from core.lab import adapters, data, device as devices, jobs, models, paths, runs
from core.lab.cli import option
from core.lab.errors import DataError, RunError
from core.lab.training import train

COMMAND = "prefer"
DATA_SOURCE = "instruction-data-with-preference"
DATA_FILE, DATA_SHA256 = "instruction-data-with-preference.json", \
    "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"
START_STAGES = ("instruct", "import", "prefer")  # instruction-following models (an import may be one)
START_EVAL_FILE, RESPONSES_FILE = "start_eval.json", "responses.json"
CURVES = ("val_loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp")


@dataclass
class Settings:
    start: str | None = option(None, flag="--from", metavar="RUN",
                               help="run to start from: an instruction-tuned run (stage 6), an import, or a DPO run")
    data: str = option(DATA_SOURCE, help="preference data: a registry name or file:PATH "
                                         "(JSON records {instruction, input, chosen, rejected})")
    steps: int | None = option(None, group="budget", help="optimiser steps (default 100)")
    minutes: float | None = option(None, group="budget", help="wall-clock training budget")
    beta: float = option(0.1, help="β: how far the model may move from the reference (small β, large moves)")
    lora_rank: int | None = option(None, help="train LoRA adapters of this rank instead of every weight")
    lora_alpha: float | None = option(None, help="LoRA alpha (default: the rank)")
    lora_targets: tuple[str, ...] = option(DEFAULT_TARGETS, help="matrices that get adapters: qkv,proj,mlp")
    lr: float | None = option(None, help="peak learning rate (default: by model size and LoRA)")
    batch_size: int = option(8, help="preference pairs per step")
    warmup: int = option(10, help="warm-up steps of the learning rate")
    eval_every: int = option(20, help="steps between held-out evaluations")
    eval_pairs: int = option(32, help="held-out pairs evaluated (from the validation split)")
    answers: int = option(10, help="held-out test instructions both models answer at the end (0: none)")
    max_new_tokens: int = option(64, help="token budget per answer")
    seed: int = option(1337)
    device: str | None = option(None, help="cpu, cuda, mps (default: the best available)")
    run_id: str | None = option(None, help="name of the new run")
    resume: bool = option(False, help="continue a stopped run from its checkpoint")

    def __post_init__(self):
        if not self.start and not self.resume:
            raise RunError("Choose the run to start from (--from RUN): an instruction-tuned model.")
        check_beta(self.beta)
        if self.steps is not None and self.steps < 1:
            raise TrainingError(f"--steps must be at least 1 (got {self.steps}).")
        if self.minutes is not None and not self.minutes > 0:
            raise TrainingError(f"--minutes must be more than 0 (got {self.minutes}).")
        if self.lora_rank is not None:
            check_lora_settings(self.lora_rank, self.lora_alpha, self.lora_targets)
        if self.warmup < 0:
            raise TrainingError(f"warm-up steps must be 0 or more (got {self.warmup}).")
        for name in ("batch_size", "eval_every", "eval_pairs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name.replace('_', ' ')} must be at least 1 (got {getattr(self, name)}).")
        if self.answers < 0:
            raise TrainingError(f"answers must be 0 or more (got {self.answers}).")


def print_progress(record) -> None:
    """The command line's progress line on stderr."""
    if isinstance(record, str):
        print(record, file=sys.stderr, flush=True)
        return
    parts = [f"step {record.get('step'):>5}"]
    for key, label in (("train_loss", "loss"), ("val_loss", "val"), ("reward_margin", "margin"),
                       ("reward_accuracy", "accuracy"), ("chosen_logp", "chosen"), ("rejected_logp", "rejected")):
        if record.get(key) is not None:
            parts.append(f"{label} {record[key]:.3f}")
    if record.get("elapsed_s") is not None:
        parts.append(f"{record['elapsed_s']:.0f} s")
    print(" | ".join(parts), file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- data and start model


def preference_file(source: str) -> Path:
    """The file of a preference source: `file:PATH`, a registry name, or the book's file by name."""
    if source.startswith("file:"):
        return Path(source[len("file:"):])
    if source in data.SOURCES or source != DATA_SOURCE:
        return data.locate(source)
    for folder in paths.search_dirs():  # not (yet) in the registry: find it by name, check its sha256
        candidate = folder / DATA_FILE
        if candidate.is_file() and data.sha256_of(candidate) == DATA_SHA256:
            return candidate
    raise DataError(f"{DATA_FILE} is not on this machine: put it in a folder named by GLASSBOX_DATA_DIR.")


def load_preferences(source: str) -> tuple[list[dict], list[int]]:
    path = preference_file(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read the preference data {path}: {exc}") from None
    return parse_preference_records(text, origin=f"'{source}'")


def load_start(from_run: str):
    run = runs.open_run(from_run)
    if run.stage not in START_STAGES:
        raise RunError(f"Run {from_run!r} is a {run.stage!r} run; DPO starts from a model that already "
                       "follows instructions: a stage-6 run, an imported model, or another DPO run.")
    if not adapters.has_weights(run):
        raise RunError(f"Run {from_run!r} has no weights yet: wait for its first checkpoint.")
    model, tokenizer, _ = adapters.load_run(from_run)
    return model, tokenizer


def prompt_format_for(tokenizer):
    """(prompt format, end-of-answer id) of the start model's template: SmolLM2 speaks ChatML
    (the instruction as the user's turn, answers end with <|im_end|>); our runs speak Alpaca."""
    template = template_for(tokenizer)
    if template.name != "chatml":
        return format_prompt, require_end_of_text(tokenizer)

    def chatml(entry: dict) -> str:
        text = entry["instruction"] + (f"\n\n{entry['input']}" if entry.get("input") else "")
        return template.render([{"role": "user", "content": text}])

    return chatml, tokenizer.encode("<|im_end|>")[0]


def default_lr(model, lora: bool) -> float:
    """Full DPO moves every weight: GPT-2-sized models take the book's 5e-6; LoRA adapters start at
    zero and need larger steps."""
    big = model.config.n_embd >= 512
    return (2e-4 if big else 2e-3) if lora else (5e-6 if big else 5e-4)


def _train_config(s: Settings, model, stored: dict | None) -> TrainConfig:
    if stored and not (s.steps or s.minutes):
        return TrainConfig.from_dict(stored["train"])
    lr = s.lr if s.lr is not None else default_lr(model, s.lora_rank is not None)
    steps = s.steps if s.steps or s.minutes else 100
    return TrainConfig(max_steps=steps, max_minutes=s.minutes, batch_size=s.batch_size, lr=lr,
                       min_lr=lr / 10, warmup_steps=s.warmup, weight_decay=0.0, eval_every=s.eval_every,
                       sample_every=10**9, checkpoint_every=max(s.eval_every, 50), log_every=5, seed=s.seed)


# ---------------------------------------------------------------------------- the stage


def _settings_of_run(settings: Settings, run_id: str) -> tuple[Settings, dict | None]:
    """When resuming, the run's own choices (start, data, β, LoRA) win over the command line."""
    path = runs.run_dir(run_id)
    if not settings.resume or not (path / "config.json").exists():
        return settings, None
    stored = runs.open_run(run_id).config
    if stored.get("stage") != COMMAND:
        raise RunError(f"Run {run_id!r} is a {stored.get('stage')} run, not a DPO run.")
    p = stored["prefer"]
    lora = stored.get("lora") or {}
    kept = dict(start=stored["from"], data=p["data"], beta=p["beta"], lora_rank=lora.get("rank"),
                lora_alpha=lora.get("alpha"), lora_targets=tuple(lora.get("targets") or DEFAULT_TARGETS),
                eval_pairs=p["eval_pairs"], answers=p["answers"], max_new_tokens=p["max_new_tokens"])
    return Settings(**{**settings.__dict__, **kept}), stored


def run(settings: Settings, progress=print_progress) -> dict:
    """DPO from an instruction-tuned run (or resume one); the only code that writes a DPO run."""
    started = time.perf_counter()
    devices.configure_training_threads()
    run_id = runs.validate_run_id(settings.run_id) if settings.run_id else runs.new_run_id("prefer")
    s, stored = _settings_of_run(settings, run_id)
    say = progress or (lambda message: None)
    model, tokenizer = load_start(runs.validate_run_id(s.start))
    records, identical = load_preferences(s.data)
    splits = split_records(records)  # the book's 85 / 10 / 5 split: the test part stays unseen
    if identical:
        say(f"{len(identical)} record(s) have identical chosen and rejected answers (record "
            f"{', '.join(map(str, identical[:8]))}{' …' if len(identical) > 8 else ''}): left out, "
            "DPO cannot learn from a pair without a difference.")
    lora = s.lora_rank is not None
    reference = None
    if lora:
        torch.manual_seed(s.seed)  # A's random start is part of the run: the same seed, the same adapter
        add_lora(model, s.lora_rank, s.lora_alpha, s.lora_targets)
        adapters.adapter_only_checkpoints(model)
    else:
        reference = reference_copy(model)
    config = _train_config(s, model, stored)
    run_config = {"from": s.start, "train": config.to_dict(), "model": model.config.to_dict(),
                  "prefer": {"data": s.data, "beta": s.beta, "eval_pairs": s.eval_pairs, "answers": s.answers,
                             "max_new_tokens": s.max_new_tokens, "identical_pairs_skipped": identical,
                             "trainable_parameters": trainable_parameters(model)},
                  "splits": {name: len(part) for name, part in splits.items()}}
    if lora:
        run_config["lora"] = adapters.lora_config(s.start, s.lora_rank, s.lora_alpha, s.lora_targets, model)
    runs.create_run(run_id, COMMAND, run_config, parent=s.start, resume=s.resume)
    if stored:
        runs.update_config(run_id, train=config.to_dict())
    elif lora:
        adapters.save_adapter_run(run_id, model, s.start)
    else:
        models.save_model_run(run_id, model, tokenizer)
    prompt_format, end_id = prompt_format_for(tokenizer)
    task = DPOTask(tokenizer, splits, model.config.context_length, beta=s.beta, reference=reference,
                   seed=s.seed, eval_pairs=s.eval_pairs, prompt_format=prompt_format, end_id=end_id)
    device = devices.pick_device(s.device) if s.device else None
    start_eval = _start_evaluation(run_id, task, model, say)
    summary = train(run_id, model, task, config, resume=s.resume, device=device, progress=progress)
    result = {"run_id": run_id, "reward_accuracy_start": start_eval["reward_accuracy"],
              "reward_accuracy": summary.get("reward_accuracy"), "reward_margin": summary.get("reward_margin"),
              "val_loss": summary.get("val_loss"), "val_loss_start": start_eval["val_loss"],
              "chosen_logp_start": start_eval["chosen_logp"], "chosen_logp": summary.get("chosen_logp"),
              "rejected_logp_start": start_eval["rejected_logp"], "rejected_logp": summary.get("rejected_logp"),
              "steps": summary.get("steps"), "train_loss": summary.get("train_loss"),
              "trainable_parameters": trainable_parameters(model), "lora": lora,
              "identical_pairs_skipped": len(identical), "stopped": bool(summary.get("stopped"))}
    if not result["stopped"] and s.answers:
        _answer_side_by_side(run_id, model, reference, tokenizer, splits["test"][: s.answers], s, say,
                             prompt_format, end_id)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _start_evaluation(run_id: str, task: DPOTask, model, say) -> dict:
    """The held-out statistics before any step (kept in start_eval.json, and as metrics row 0)."""
    path = runs.run_dir(run_id) / START_EVAL_FILE
    if path.exists():
        return runs.read_json(path)
    say("Scoring the held-out pairs with the starting model …")
    model.eval()
    stats = task.evaluate(model)
    model.train()
    runs.write_json_atomic(path, stats)
    runs.append_jsonl(runs.run_dir(run_id) / "metrics.jsonl", {"step": 0, "tokens": 0, **stats, "elapsed_s": 0.0})
    say(f"Start: held-out DPO loss {stats['val_loss']:.3f} (ln 2 = 0.693), margin {stats['reward_margin']:.3f}")
    return stats


def _answer_side_by_side(run_id, model, reference, tokenizer, records, s: Settings, say, prompt_format,
                         end_id) -> None:
    """Both models answer the same unseen instructions: SFT (the start) first, then DPO."""
    model.eval()

    def answers(net, label):
        say(f"{label}: answering {len(records)} held-out test instructions …")
        return [answer(net, tokenizer, r, prompt_format, end_id, s.max_new_tokens) for r in records]

    with models.generation_threads(model):
        with (lora_disabled(model) if reference is None else nullcontext()):
            sft = answers(reference or model, "SFT (start)")
        dpo = answers(model, "DPO (tuned)")
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"],
             "sft_response": a[0], "dpo_response": b[0], "chosen": r["chosen"], "rejected": r["rejected"],
             "sft_stopped": a[1], "dpo_stopped": b[1]} for r, a, b in zip(records, sft, dpo)]
    runs.write_json_atomic(runs.run_dir(run_id) / RESPONSES_FILE, rows)


def start(settings: Settings, run_id: str, owner: str | None = None):
    """Start DPO as a background job (what the page's button does)."""
    return jobs.start_stage(COMMAND, settings, run_id, owner=owner)


# ---------------------------------------------------------------------------- what the page reads


def results(run_id: str) -> dict:
    """A DPO run as the page draws it: config, state, the curves, the start and the answers."""
    run = runs.open_run(run_id)
    metrics = run.metrics()
    evals = [m for m in metrics if "reward_margin" in m]
    path = run.path / RESPONSES_FILE
    start_path = run.path / START_EVAL_FILE
    return {"run_id": run_id, "config": run.config, "state": run.state, "status": run.status,
            "metrics": metrics, "evals": evals, "losses": [m for m in metrics if "train_loss" in m],
            "start": runs.read_json(start_path) if start_path.exists() else None,
            "latest": evals[-1] if evals else None,
            "responses": runs.read_json(path) if path.exists() else []}


def responses(run_id: str) -> list[dict]:
    """The side-by-side answers of a finished DPO run ([] before they exist)."""
    path = runs.run_dir(runs.validate_run_id(run_id)) / RESPONSES_FILE
    return runs.read_json(path) if path.exists() else []


def run_ids() -> list[str]:
    return [r.id for r in runs.list_runs(COMMAND) if not r.error]


def start_runs() -> list[str]:
    """Runs DPO can start from: instruction-following models with weights, newest first."""
    return [r.id for r in runs.list_runs(START_STAGES) if not r.error and adapters.has_weights(r)]


def describe_start(run_id: str) -> dict:
    """Stage, parameters and a LoRA budget of a start run, for the page's 'before training' table."""
    try:
        model, _ = load_start(run_id)
    except GlassBoxError as e:
        return {"error": str(e)}
    full = sum(p.numel() for p in model.parameters())
    return {"stage": runs.open_run(run_id).stage, "parameters": full, "n_embd": model.config.n_embd}


CODE = {"loss": (dpo_loss,), "log-probs": (sequence_logprobs,), "task": (DPOTask.pair_loss, DPOTask.evaluate),
        "lora": (LoRALinear.forward,)}
