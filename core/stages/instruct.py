"""Stage 6: instruction-tune a language model, keeping the best-validation weights, and compare.

    python -m core instruct --from my-pretrain --data instruction-data --minutes 10 \
        --run-id my-instruct [--mask-prompt] [--eval-limit 50] [--lora-rank 8] [--resume]

Answers the test instructions with the starting model, tunes it, answers them again with the
tuned model, and saves both side by side in `checkpoints/<run-id>/responses.json`. The JSON last
line holds run_id, train_loss, val_loss, format_rate_start, format_rate_tuned and seconds.
"""

from __future__ import annotations

import html
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.gpt import instruct as ins
from core.gpt import lora
from core.gpt.classify import KeepBest, DEFAULT_PATIENCE
from core.gpt.errors import GlassBoxError
from core.gpt.train import TrainConfig
from core.lab import data as data_registry
from core.lab import jobs, models, references, runs, snapshots
from core.lab.cli import option
from core.lab.errors import DataError, RunError
from core.lab.tokenizer_files import save_tokenizer
from core.lab.training import train
from core.gpt.model import GPT, GPTConfig
from core.lab.tokenizer_files import load_tokenizer
from core.stages.classify import (ADAPTER_FILE, COSTS_CAPTION, LORA_TARGETS, check_start_run, cost_table,
                                  keep_best_hook, load_keep_best, load_language_model, load_start_model)

COMMAND = "instruct"
RESPONSES_FILE = "responses.json"          # what stage 7 reads
FORMAT_RATES_FILE = "format_rates.json"
BASE_ANSWERS_FILE = "base_answers.json"    # the starting model's answers, kept for resume
DEFAULT_STEPS = 200  # a short default that shows the change on a small model


@dataclass
class Settings:
    start: str | None = option(None, flag="--from", metavar="RUN",
                               help="run to start from: a stage-4 (pretrain) run or an imported model")
    data: str = option("instruction-data", help="instruction data: a registry name or file:<path> "
                                                "(JSON records {instruction, input, output})")
    steps: int | None = option(None, group="budget", help=f"number of optimiser steps (default {DEFAULT_STEPS})")
    minutes: float | None = option(None, group="budget", help="wall-clock training budget")
    mask_prompt: bool = option(False, help="grade only the answer tokens (the prompt is left out of the loss)")
    eval_limit: int | None = option(None, help="compare the two models on the first N test instructions only")
    max_new_tokens: int = option(96, help="token budget per answer when comparing the models (default 96)")
    batch_size: int = option(8, help="examples per step (default 8)")
    lr: float | None = option(None, help="peak learning rate (default: 1e-3 for small models, "
                                         "5e-5 for GPT-2 sizes; LoRA: 1e-3)")
    warmup_steps: int = option(20, help="warm-up steps (default 20)")
    eval_every: int = option(50, help="steps between validation losses (default 50)")
    sample_every: int = option(50, help="steps between answers to the validation instruction (default 50)")
    seed: int = option(1337, help="seed of the batches (default 1337)")
    patience: int | None = option(None, help=f"evaluations without a better validation loss before "
                                             f"training stops (default {DEFAULT_PATIENCE}; 0 = never)")
    lora_rank: int | None = option(None, metavar="R", help="train LoRA adapters of rank R instead of every weight")
    lora_alpha: float | None = option(None, metavar="A", help="LoRA scale alpha (default: the rank)")
    lora_targets: tuple[str, ...] = option(LORA_TARGETS, metavar="qkv,proj,mlp",
                                           help="matrices that get LoRA adapters (default qkv,proj,mlp)")
    split_seed: int | None = option(None, cli=False)  # None: the book's sequential split
    run_id: str | None = option(None, help="name of the new run")
    resume: bool = option(False, help="continue a stopped run")

    def __post_init__(self):
        if not (self.start or "").strip():
            raise GlassBoxError("Name the run to start from with --from RUN.")
        if not self.run_id:
            raise GlassBoxError("Name the new run with --run-id NAME.")
        if self.steps is not None and self.steps < 1:
            raise GlassBoxError("--steps must be at least 1.")
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise GlassBoxError("--minutes must be more than 0.")
        if self.batch_size < 1:
            raise GlassBoxError("--batch-size must be at least 1.")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise GlassBoxError("--eval-limit must be at least 1.")
        if self.max_new_tokens < 1:
            raise GlassBoxError("The token budget per answer must be at least 1.")
        if self.lora_rank is not None:
            lora.check_lora_settings(self.lora_rank, self.lora_alpha, self.lora_targets)
        self.lora_targets = tuple(self.lora_targets)

    def train_config(self, n_embd: int) -> TrainConfig:
        lr = self.lr if self.lr is not None else (1e-3 if self.lora_rank else ins.suggested_lr(n_embd))
        steps = self.steps if self.steps is not None or self.minutes is not None else DEFAULT_STEPS
        return TrainConfig(max_steps=steps, max_minutes=self.minutes, batch_size=self.batch_size,
                           lr=lr, min_lr=lr / 10, warmup_steps=self.warmup_steps,
                           eval_every=self.eval_every, sample_every=self.sample_every,
                           checkpoint_every=max(self.eval_every, 100), log_every=5, seed=self.seed)

    def recorded(self) -> dict:
        """What config.json keeps under "instruct" (read back on resume and by the page)."""
        return {"data": self.data, "mask_prompt": self.mask_prompt, "eval_limit": self.eval_limit,
                "max_new_tokens": self.max_new_tokens, "split_seed": self.split_seed,
                "patience": DEFAULT_PATIENCE if self.patience is None else self.patience}


def load_instruction_data(source: str = "instruction-data") -> list[dict]:
    """The records of a registry source (e.g. `instruction-data`) or of `file:<path>` JSON."""
    path = Path(source[len("file:"):]) if source.startswith("file:") else data_registry.locate(source)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read the instruction data {path}: {exc}") from None
    return ins.parse_instruction_records(text, origin=f"'{source}'")


def suggested_lr(start_run: str) -> float:
    """The peak learning rate that suits a start run (see core.gpt.instruct.suggested_lr)."""
    return ins.suggested_lr((runs.open_run(start_run).config.get("model") or {}).get("n_embd", 0))


def _start_model(settings: Settings):
    model, tokenizer = load_start_model(settings.start)
    ins.require_end_of_text(tokenizer)
    lora_info = None
    if settings.lora_rank is not None:
        rank, alpha, targets = lora.check_lora_settings(settings.lora_rank, settings.lora_alpha,
                                                        settings.lora_targets)
        names = lora.add_lora(model, rank, alpha, targets)
        lora_info = {"rank": rank, "alpha": alpha, "targets": list(targets), "matrices": len(names),
                     "parent": settings.start}
    return model, tokenizer, lora_info


def _answers_of_start(run_id, model, tokenizer, test, settings, say) -> list[ins.Answer]:
    """The starting model on the test split (kept, so a resumed run needn't redo it)."""
    base_file = runs.run_dir(run_id) / BASE_ANSWERS_FILE
    saved = runs.read_json(base_file) if base_file.exists() else None
    if saved and saved.get("n") == len(test) and saved.get("max_new_tokens") == settings.max_new_tokens:
        return [ins.answer_from_dict(d) for d in saved["answers"]]
    say(f"Answering {len(test)} test instructions with the starting model {settings.start} …")
    with models.generation_threads(model), lora.lora_disabled(model):
        answers = ins.answer_all(model, tokenizer, test, settings.max_new_tokens, say, "start")
    runs.write_json_atomic(base_file, {
        "n": len(test), "max_new_tokens": settings.max_new_tokens,
        "format_rate": ins.format_rate([a.follows_format for a in answers]),
        "answers": [ins.answer_to_dict(a) for a in answers]})
    return answers


def _save_tuned(run_id: str, model, tokenizer, lora_info: dict | None) -> None:
    path = runs.run_dir(run_id)
    if lora_info:
        runs.save_tensors(path / ADAPTER_FILE, {k: v.detach().cpu().contiguous()
                                                for k, v in lora.lora_tensors(model).items()})
        (path / "model.safetensors").unlink(missing_ok=True)  # the parent's weights are not copied
    else:
        models.save_model_run(run_id, model, tokenizer)


def run(settings: Settings, progress=None, train_config: TrainConfig | None = None) -> dict:
    """Stage 6 end to end: answers of the start model, tuning, answers of the tuned model.

    Writes into `checkpoints/<run_id>/`: the usual training files (metrics, samples, weights,
    resume state), `base_answers.json`, and — once training ends without a stop request —
    `responses.json` and `format_rates.json`. Returns the headline figures.
    """
    started = time.time()
    say = (lambda message: progress(message)) if progress else (lambda message: None)
    runs.validate_run_id(settings.run_id)
    runs.validate_run_id(settings.start)
    model, tokenizer, lora_info = _start_model(settings)
    config = train_config or settings.train_config(model.config.n_embd)
    splits = ins.split_records(load_instruction_data(settings.data), seed=settings.split_seed)
    test = splits["test"][: settings.eval_limit] if settings.eval_limit else splits["test"]
    run_config = {"from": settings.start, "instruct": settings.recorded(), "train": config.to_dict(),
                  "model": model.config.to_dict(), "tokenizer": getattr(tokenizer, "kind", None),
                  "splits": {name: len(part) for name, part in splits.items()}, "lora": lora_info,
                  "snapshots": snapshots.default_budget(model, bool(lora_info),
                                                        ins.format_prompt(splits["val"][0]))}
    runs.create_run(settings.run_id, "instruct", run_config, parent=settings.start, resume=settings.resume)
    folder = runs.run_dir(settings.run_id)
    save_tokenizer(tokenizer, folder / "tokenizer.json")
    if not lora_info and not (folder / "model.safetensors").exists():
        models.save_model_run(settings.run_id, model, tokenizer)  # start weights (overwritten)
    result = _tune_and_compare(settings, model, tokenizer, splits, test, config, lora_info, say, progress)
    result["seconds"] = round(time.time() - started, 1)
    return result


def _tune_and_compare(settings, model, tokenizer, splits, test, config, lora_info, say, progress) -> dict:
    run_id = settings.run_id
    base_answers = _answers_of_start(run_id, model, tokenizer, test, settings, say)
    rate_start = ins.format_rate([a.follows_format for a in base_answers])
    say(f"Format-following rate of the starting model: {rate_start:.0%}")
    task = ins.InstructionTask(tokenizer, splits, model.config.context_length, mask_prompt=settings.mask_prompt,
                               seed=config.seed, sample_tokens=min(64, settings.max_new_tokens))
    keep = load_keep_best(run_id, settings.recorded()["patience"] or None)
    plan = snapshots.Plan(runs.open_run(run_id).config.get("snapshots", {}).get("budget_bytes", 0), model)
    summary = train(run_id, model, task, config, resume=settings.resume, snapshot_plan=plan,
                    progress=keep_best_hook(run_id, model, keep, config, progress))
    result = {"run_id": run_id, "steps": summary.get("steps"), "train_loss": summary.get("train_loss"),
              "val_loss": summary.get("val_loss"), "format_rate_start": rate_start,
              "format_rate_tuned": None, "stopped": bool(summary.get("stopped")),
              "weights_step": summary.get("steps")}
    if result["stopped"]:
        say("Stopped: resume the run to finish tuning and to compare the answers.")
        return result
    if keep.best_step is not None:
        keep.restore(model)
        result.update(weights_step=keep.best_step, val_loss=round(keep.best_loss, 5))
    _save_tuned(run_id, model, tokenizer, lora_info)
    say(f"Answering {len(test)} test instructions with the tuned model (weights of step {result['weights_step']}) …")
    with models.generation_threads(model):
        tuned = ins.answer_all(model, tokenizer, test, settings.max_new_tokens, say, "tuned")
    rate_tuned = ins.format_rate([a.follows_format for a in tuned])
    folder = runs.run_dir(run_id)
    runs.write_json_atomic(folder / RESPONSES_FILE, ins.side_by_side(test, base_answers, tuned))
    runs.write_json_atomic(folder / FORMAT_RATES_FILE, {
        "start": rate_start, "tuned": rate_tuned, "n": len(test), "max_new_tokens": settings.max_new_tokens,
        "from": settings.start, "weights_step": result["weights_step"], "best_val_loss": result["val_loss"],
        "early_stopped": keep.should_stop(),
        "rules": "non-empty; ends with end-of-text before the token budget; no template echo"})
    say(f"Format-following rate: start {rate_start:.0%} → tuned {rate_tuned:.0%}")
    result["format_rate_tuned"] = rate_tuned
    return result


def print_progress(message) -> None:
    print(describe_progress(message), file=sys.stderr, flush=True)


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


def start(settings: Settings, run_id: str, owner: str | None = None):
    return jobs.start_stage(COMMAND, settings, run_id, owner=owner)


# ---------------------------------------------------------------------------------- for the page


def read_responses(run_id: str) -> list[dict]:
    """The side-by-side records saved by a finished instruction run ([] if none yet)."""
    path = runs.run_dir(run_id) / RESPONSES_FILE
    return runs.read_json(path) if path.exists() else []


def read_format_rates(run_id: str) -> dict | None:
    path = runs.run_dir(run_id) / FORMAT_RATES_FILE
    return runs.read_json(path) if path.exists() else None


def results(run_id: str) -> dict | None:
    """{"rates": format_rates.json, "responses": responses.json} of a finished run, or None."""
    rates = read_format_rates(run_id)
    return None if rates is None else {"rates": rates, "responses": read_responses(run_id)}


def load_comparison_models(run_id: str, device=None):
    """(start model, tuned model, tokenizer) of an instruction run, both in eval mode."""
    run = runs.open_run(run_id)
    if run.stage != "instruct":
        raise RunError(f"Run {run_id!r} is not an instruction-tuning run.")
    if not (run.has_weights() or (run.path / ADAPTER_FILE).is_file()):
        raise RunError(f"Run {run_id!r} has no weights yet: wait for its first checkpoint.")
    start_id = run.config.get("from") or run.parent
    try:
        base_model, _, _ = load_language_model(start_id, device=device)
    except RunError as e:
        raise RunError(f"The starting run {start_id!r} of {run_id!r} cannot be opened: {e}") from None
    tuned_model, tokenizer, _ = load_language_model(run_id, device=device)
    ins.require_end_of_text(tokenizer)
    return base_model, tuned_model, tokenizer


def answer_both(base_model, tuned_model, tokenizer, entry: dict, max_new_tokens: int = 96,
                temperature: float = 0.0, top_k: int | None = None) -> dict:
    with models.generation_threads(tuned_model):
        return ins.answer_both(base_model, tuned_model, tokenizer, entry, max_new_tokens, temperature, top_k)


# The page offers the language models that are not instruction-tuned yet (the CLI takes any).
START_STAGES = tuple(s for s in models.LANGUAGE_MODEL_STAGES if s != "instruct")


def data_overview(source: str = "instruction-data") -> dict:
    """The split sizes and one training record in the template, for the page."""
    splits = ins.split_records(load_instruction_data(source))
    return {"sizes": {name: len(splits[name]) for name in ("train", "val", "test")},
            "example": ins.format_example(splits["train"][1]) + ins.END_OF_TEXT,
            "val_instruction": splits["val"][0]["instruction"]}


def instruct_runs() -> list[str]:
    return [r.id for r in runs.list_runs("instruct") if not r.error]


def curves(run_id: str) -> tuple[list[dict], list[dict], int | None]:
    """(metrics, samples, step of the weights kept so far or at the end) of an instruction run."""
    path = runs.run_dir(run_id)
    try:
        rates = read_format_rates(run_id)
    except GlassBoxError:
        rates = None  # a damaged file: the page says so below; the curves still draw
    best = path / "best.json"
    step = rates.get("weights_step") if rates else (runs.read_json(best)["step"] if best.is_file() else None)
    return runs.read_jsonl(path / "metrics.jsonl"), runs.read_jsonl(path / "samples.jsonl"), step


def expected(run_id: str, metrics: list[dict]) -> dict:
    """Expected vs yours: the reference run of this start shape and recipe (band) and the health
    checks' sentences (core.lab.references)."""
    return references.expected_vs_yours(runs.open_run(run_id).config, metrics, "instruct")


def _cell(text: str) -> str:
    """Escaped text for a table cell: line breaks become <br>, so a blank line in a model's answer
    cannot end the HTML block (Markdown ends raw HTML at an empty line) and spill the table."""
    return "<br>".join(html.escape(line) for line in str(text).splitlines()) if text else ""


def _answer_cell(row: dict, model: str) -> str:
    """One model's answer ("base" or "tuned") with a ✓ / ✗ badge for the format rules."""
    text, ok = row[f"{model}_response"], row[f"{model}_follows_format"]
    problems, new_tokens = row[f"{model}_problems"], row.get(f"{model}_new_tokens")
    badge = ("<span style='color:#1a7f37;font-weight:600'>✓ answers</span>" if ok else
             f"<span style='color:#cf222e;font-weight:600'>✗ {_cell('; '.join(problems) or 'off format')}</span>")
    if not text:  # a model that only continues text often writes nothing but line breaks and spaces
        tokens = f" for {new_tokens} tokens" if new_tokens else ""
        return f"{badge}<br><i>(nothing but spaces and line breaks{tokens})</i>"
    return f"{badge}<br>{_cell(text if len(text) <= 400 else text[:400] + ' …')}"


def side_by_side_html(rows: list[tuple]) -> str:
    """(number, record) rows as one HTML table; every piece of text is escaped, with no blank line."""
    td = "<td style='vertical-align:top'>"
    head = ("<tr><th>#</th><th>instruction</th><th>reference</th><th>pre-trained</th>"
            "<th>instruction-tuned</th></tr>")
    body = []
    for number, r in rows:
        instruction = _cell(r["instruction"]) + (f"<br><i>{_cell(r['input'])}</i>" if r.get("input") else "")
        body.append(f"<tr>{td}{_cell(number)}</td>{td}{instruction}</td>{td}{_cell(r['output'])}</td>"
                    f"{td}{_answer_cell(r, 'base')}</td>{td}{_answer_cell(r, 'tuned')}</td></tr>")
    return f"<table style='width:100%;font-size:0.9em'>{head}{''.join(body)}</table>"


def own_row(instruction: str, extra_input: str, answers: dict) -> dict:
    """A responses.json-shaped row for an instruction the learner typed."""
    row = {"instruction": instruction, "input": extra_input, "output": "—"}
    for name in ("base", "tuned"):
        a = answers[name]
        row.update({f"{name}_response": a.text, f"{name}_follows_format": a.follows_format,
                    f"{name}_problems": a.problems, f"{name}_new_tokens": a.new_tokens})
    return row


def weights_version(run_id: str) -> float:
    """Changes whenever the run's weights do (a page's cache key)."""
    path = runs.run_dir(run_id)
    files = [path / name for name in ("model.safetensors", ADAPTER_FILE) if (path / name).is_file()]
    return max((f.stat().st_mtime for f in files), default=0.0)


def page_settings(start: str, minutes: float, lr: float, batch_size: int, mask_prompt: bool, eval_limit: int,
                  run_id: str, learns: str, rank: int, alpha: float) -> Settings:
    """The page's controls as Settings ("lora" as what learns turns the LoRA options on)."""
    lora_options = dict(lora_rank=int(rank), lora_alpha=float(alpha)) if learns == "lora" else {}
    return Settings(start=start, data="instruction-data", minutes=float(minutes), lr=float(lr),
                    batch_size=int(batch_size), mask_prompt=bool(mask_prompt), eval_limit=int(eval_limit),
                    run_id=run_id, **lora_options)


def choice_costs(start_run: str, rank: int = 8, alpha: float | None = None, targets=LORA_TARGETS,
                 batch_size: int = 8, time_steps: int = 0) -> list[dict]:
    """Stage 6's choices side by side, before training: every weight, or LoRA adapters."""
    run = check_start_run(start_run)
    shape = run.config["model"]

    def build_all():
        return GPT(GPTConfig.from_dict(shape))

    def build_lora():
        model = GPT(GPTConfig.from_dict(shape))
        lora.add_lora(model, rank, alpha, targets)
        return model

    task = None
    if time_steps:
        tokenizer = load_tokenizer(run.path / "tokenizer.json")
        splits = ins.split_records(load_instruction_data("instruction-data"))
        task = ins.InstructionTask(tokenizer, {"train": splits["train"][:64], "val": splits["val"][:1]},
                                   int(shape["context_length"]))
    config = TrainConfig(max_steps=1, batch_size=batch_size, lr=1e-4)
    return cost_table({"all": build_all, "lora": build_lora}, task, config, time_steps)


__all__ = ["GlassBoxError"]  # re-exported for the page

CODE = {
    "template": (ins.format_prompt,),
    "batches": (ins.collate_instructions,),
    "training": (ins.InstructionTask, KeepBest),
    "answers": (ins.generate_answer, ins.format_problems),
}
