"""Stage 5: fine-tune a language model to tell spam from ham, keeping the best-validation weights.

    python -m core classify --from my-pretrain-run --data sms-spam --minutes 5 --run-id spam-1
    python -m core classify --from random:my-pretrain-run --steps 300 --run-id spam-random
    python -m core classify --from smollm2 --lora-rank 8 --minutes 5 --run-id spam-lora

Prints progress on stderr and, as the last line of stdout, the headline figures:
run_id, train/val/test accuracy (0–1) and loss, seconds (and the step the kept weights are from).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from typing import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.gpt import classify as C
from core.gpt import lora
from core.gpt.errors import GlassBoxError
from core.gpt.model import GPT, GPTConfig
from core.gpt.train import TrainHooks, TrainState, train_step
from core.lab import data as data_registry
from core.lab import jobs, models, references, runs, snapshots
from core.lab.cli import option
from core.lab.errors import DataError, RunError
from core.lab.tokenizer_files import load_tokenizer, save_tokenizer
from core.lab.training import train

COMMAND = "classify"
FREEZE_MODES = tuple(C.FREEZE_MODES)
DEFAULT_FREEZE = C.DEFAULT_FREEZE
DEFAULT_STEPS = C.DEFAULT_STEPS
RANDOM_PREFIX = "random:"  # `--from random:RUN` = RUN's architecture and tokeniser, fresh weights
RESULTS_FILE = "results.json"
BEST_FILE, BEST_INFO_FILE = "best.safetensors", "best.json"  # the best weights so far (resume)
ADAPTER_FILE = "adapter.safetensors"  # a LoRA run's own weights: adapters (+ new head)
LORA_TARGETS = tuple(lora.DEFAULT_TARGETS)
FREEZE_HELP = {**C.FREEZE_MODES, "lora": "LoRA adapters of the chosen rank, and the head"}
TRAIN_ACCURACY_SUBSET = C.TRAIN_ACCURACY_SUBSET


@dataclass
class Settings:
    start: str | None = option(None, flag="--from", metavar="RUN",
                               help="run to start from: a stage-4 'pretrain' run or an imported model; "
                                    "'random:RUN' = RUN's architecture and tokeniser with random weights")
    data: str = option("sms-spam", help="labelled SMS data (default: sms-spam)")
    steps: int | None = option(None, group="budget", help=f"optimiser steps (default {DEFAULT_STEPS})")
    minutes: float | None = option(None, group="budget", help="train for this many minutes")
    freeze: str = option(DEFAULT_FREEZE, choices=FREEZE_MODES,
                         help="what learns: head | last-block (head + last block + final norm) | all "
                              f"(default {DEFAULT_FREEZE}, the best measured)")
    random_init: bool = option(False, help="start from random weights (same shape and tokeniser as --from)")
    max_length: int | None = option(None, help="pad/truncate messages to this many tokens "
                                               "(default: longest training message, at most the context length)")
    batch_size: int | None = option(None, help="messages per step (default 16)")
    lr: float | None = option(None, help="peak learning rate (default 1e-3)")
    eval_every: int | None = option(None, help="steps between evaluations (default 40)")
    warmup: int | None = option(None, help="warm-up steps of the learning rate (default 20; a short "
                                           "minutes budget of a large model may be only ~40 steps)")
    patience: int | None = option(None, help=f"evaluations without a better validation loss before "
                                             f"training stops (default {C.DEFAULT_PATIENCE}; 0 = never)")
    lora_rank: int | None = option(None, metavar="R", help="train LoRA adapters of rank R (and the head) "
                                                           "instead of the weights chosen by --freeze")
    lora_alpha: float | None = option(None, metavar="A", help="LoRA scale alpha (default: the rank)")
    lora_targets: tuple[str, ...] = option(LORA_TARGETS, metavar="qkv,proj,mlp",
                                           help="matrices that get LoRA adapters (default qkv,proj,mlp)")
    device: str | None = option(None, help="cpu, cuda or mps (default: the best available)")
    run_id: str | None = option(None, help="name of the new run (default: classify-<time>)")
    resume: bool = option(False, help="continue a stopped run from its checkpoint")

    def __post_init__(self):
        if not self.resume and not (self.start or "").strip():
            raise C.ClassifyError("Name the run to start from with --from RUN "
                                  "(see `python -m core classify --help`).")
        if self.steps is not None and self.steps < 1:
            raise C.ClassifyError("--steps must be at least 1.")
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise C.ClassifyError("--minutes must be a number above 0.")
        if self.warmup is not None and self.warmup < 0:
            raise C.ClassifyError("--warmup must be 0 or more steps.")
        if self.lora_rank is not None:
            lora.check_lora_settings(self.lora_rank, self.lora_alpha, self.lora_targets)
        self.lora_targets = tuple(self.lora_targets)

    def train_config(self) -> C.TrainConfig:
        config = C.default_train_config(max_steps=self.steps, max_minutes=self.minutes,
                                        batch_size=self.batch_size, lr=self.lr, eval_every=self.eval_every,
                                        warmup_steps=self.warmup)
        if self.lr is not None:
            config.min_lr = min(config.min_lr, self.lr / 10)
        return config


# ---------------------------------------------------------------------------------- data and models


def load_sms_examples(source: str = "sms-spam") -> list[C.Example]:
    """Read the messages of a data source: a registry name (`sms-spam`), `upload:<name>` or
    `file:<path>` (the registry checks the file and says how to get it when it is missing)."""
    registered = data_registry.SOURCES.get(source)
    if registered is not None and registered.kind != "sms":
        raise DataError(f"{source!r} is not a labelled SMS data set (it is {registered.kind!r} data); "
                        "use --data sms-spam.")
    label = source.split(":", 1)[1] if source.startswith(("upload:", "file:")) else source
    return C.parse_sms_lines(data_registry.read_text(source), source=Path(label).name)


def prepare_sms_data(tokenizer, context_length: int, source: str = "sms-spam",
                     max_length: int | None = None, seed: int = C.DATA_SEED) -> C.SmsData:
    return C.build_sms_data(load_sms_examples(source), tokenizer, context_length, max_length, seed)


def parse_start(spec: str | None, random_init: bool = False) -> tuple[str, bool]:
    """`RUN` → (RUN, random_init); `random:RUN` → (RUN, True): RUN's shape, fresh weights."""
    spec = (spec or "").strip()
    if spec.startswith(RANDOM_PREFIX):
        return spec[len(RANDOM_PREFIX):], True
    if not spec:
        raise C.ClassifyError("Name the run to start from: --from RUN (a stage-4 or imported run).")
    return spec, bool(random_init)


def check_start_run(run_id: str) -> runs.Run:
    """The run to start from must hold a language model (core.lab.models.LANGUAGE_MODEL_STAGES)."""
    run = runs.open_run(run_id)  # RunNotFoundError names the run
    if run.error:
        raise RunError(run.error)
    if run.stage not in models.LANGUAGE_MODEL_STAGES:
        raise RunError(f"Run {run_id!r} is a {run.stage!r} run. Fine-tuning starts from a language model: "
                       "a pre-trained run from stage 4 ('pretrain'), an imported model ('import') or an "
                       "instruction-tuned run ('instruct').")
    if "model" not in run.config:
        raise RunError(f"Run {run_id!r} has no model yet (its config.json has no 'model').")
    if not (run.has_weights() or "lora" in run.config):
        raise RunError(f"Run {run_id!r} has no weights yet: let it train (or resume it) first.")
    return run


def load_language_model(run_id: str, device=None):
    """(model, tokenizer, config) of a run holding a language model; a LoRA run loads as its parent
    plus its adapter (the parent is named when it has been deleted)."""
    run = runs.open_run(run_id)
    info = run.config.get("lora")
    if not info:
        return models.load_model_run(run_id, device=device)
    parent = info.get("parent") or run.parent
    try:
        model, tokenizer, _ = load_language_model(parent, device=device)
    except RunError as e:
        raise RunError(f"LoRA run {run_id!r} is an adapter on run {parent!r}, which cannot be opened "
                       f"(deleted?): {e}") from None
    lora.add_lora(model, info["rank"], info["alpha"], info["targets"])
    adapter = run.path / ADAPTER_FILE
    if not adapter.is_file():
        raise RunError(f"LoRA run {run_id!r} has no {ADAPTER_FILE} yet: let it finish first.")
    lora.load_lora_tensors(model, runs.load_tensors(adapter), source=str(adapter))
    return model.eval(), tokenizer, run.config


def load_start_model(run_id: str, random_init: bool = False, seed: int = C.DATA_SEED):
    """(model, tokenizer) to start from: the run's trained weights, or fresh random ones in the
    same shape with the same tokeniser (the control experiment: what does pre-training buy?).
    The one loader of start models for stages 5 and 6."""
    run = check_start_run(run_id)
    model, tokenizer, _ = load_language_model(run_id)
    if lora.lora_layers(model):
        lora.merge_lora(model)  # fine-tuning a LoRA run starts from its merged weights
        lora.remove_lora(model)
    if random_init:
        torch.manual_seed(seed)
        model = GPT(GPTConfig.from_dict(run.config["model"]))
    return model.train(), tokenizer


def apply_lora(model, settings: Settings) -> dict | None:
    """Freeze the model and add adapters (the classification head keeps learning)."""
    if settings.lora_rank is None:
        return None
    rank, alpha, targets = lora.check_lora_settings(settings.lora_rank, settings.lora_alpha,
                                                    settings.lora_targets)
    names = lora.add_lora(model, rank, alpha, targets)
    for p in model.lm_head.parameters():
        p.requires_grad = True
    return {"rank": rank, "alpha": alpha, "targets": list(targets), "matrices": len(names)}


def _classifier_info(run_config: dict) -> dict:
    info = run_config.get("classifier")
    if not isinstance(info, dict) or "pad_length" not in info:
        raise RunError("This run is not a finished classifier set-up (config.json has no 'classifier').")
    return info


def build_classifier_from_config(run_config: dict):
    """The classifier's architecture from its config.json (weights not loaded)."""
    info = _classifier_info(run_config)
    freeze = info.get("freeze", DEFAULT_FREEZE)
    model = C.build_classifier(run_config["model"], freeze if freeze in C.FREEZE_MODES else "head",
                               num_classes=len(info.get("labels", C.LABELS)))
    if info.get("lora"):
        lora.add_lora(model, info["lora"]["rank"], info["lora"]["alpha"], info["lora"]["targets"])
        for p in model.lm_head.parameters():
            p.requires_grad = True
    return model


def lora_classifier(run_config: dict):
    """A finished LoRA classifier: its start run's weights, the classifier head and the adapters
    (`load_lora_tensors` then fills the adapters and the head from the run's adapter file)."""
    info = _classifier_info(run_config)
    try:
        base, _ = load_start_model(info["start_run"])
    except RunError as e:
        raise RunError(f"This LoRA classifier is an adapter on run {info['start_run']!r}, which cannot "
                       f"be opened (deleted?): {e}") from None
    model = C.make_classifier(base, "head", num_classes=len(info.get("labels", C.LABELS)))
    lora.add_lora(model, info["lora"]["rank"], info["lora"]["alpha"], info["lora"]["targets"])
    for p in model.lm_head.parameters():
        p.requires_grad = True
    return model


# ---------------------------------------------------------------------------------- the stage


def _new_run(run_id: str, settings: Settings, config: C.TrainConfig):
    start_run, random_init = parse_start(settings.start, settings.random_init)
    runs.validate_run_id(run_id)
    if (runs.run_dir(run_id) / "config.json").exists():
        raise runs.RunExistsError(f"A run named {run_id!r} already exists: choose another name.")
    base, tokenizer = load_start_model(start_run, random_init)
    data = prepare_sms_data(tokenizer, base.config.context_length, settings.data, settings.max_length)
    model = C.make_classifier(base, settings.freeze)
    lora_info = apply_lora(model, settings)
    trainable, total = C.trainable_parameters(model)
    info = {"labels": list(C.LABELS), "num_classes": len(C.LABELS),
            "freeze": "lora" if lora_info else settings.freeze, "lora": lora_info,
            "random_init": random_init, "start_run": start_run, "data": settings.data,
            "pad_length": data.pad_length, "pad_id": data.pad_id, "data_seed": C.DATA_SEED,
            "counts": data.counts, "trainable_parameters": trainable, "parameters": total,
            "patience": _patience(settings)}
    runs.create_run(run_id, "classify", {"model": base.config.to_dict(), "classifier": info,
                                         "tokenizer": getattr(tokenizer, "kind", None),
                                         "train": config.to_dict(),
                                         "snapshots": snapshots.default_budget(model, bool(lora_info),
                                                                               snapshots.CLASSIFIER_PROBE)},
                    parent=start_run)
    save_tokenizer(tokenizer, runs.run_dir(run_id) / "tokenizer.json")
    return model, data, info


def _resumed_run(run_id: str, config: C.TrainConfig | None):
    path = runs.run_dir(run_id)
    stored = runs.open_run(run_id).config  # RunNotFoundError names the run
    if stored.get("stage") != "classify":
        raise C.ClassifyError(f"Run {run_id!r} is a {stored.get('stage')!r} run, not a classifier.")
    info = _classifier_info(stored)
    if info.get("lora"):  # the parent must still be there
        check_start_run(info["start_run"])
    tokenizer = load_tokenizer(path / "tokenizer.json")
    model = build_classifier_from_config(stored)
    data = prepare_sms_data(tokenizer, model.config.context_length, info.get("data", "sms-spam"),
                            max_length=info["pad_length"])
    if config is None:  # resuming with no new settings: the run's own
        config = C.TrainConfig.from_dict(stored["train"]) if "train" in stored else C.default_train_config()
    runs.update_config(run_id, train=config.to_dict())  # a resume may extend the budget
    return model, data, info, config


def _patience(settings: Settings) -> int | None:
    patience = C.DEFAULT_PATIENCE if settings.patience is None else settings.patience
    return patience or None


def keep_best_hook(run_id: str, model, keep: C.KeepBest, config: C.TrainConfig, progress=None):
    """A progress callback that keeps the best weights (on disk too, for resume) and ends the run
    `patience` evaluations after the best one, by ending its step budget there."""
    path = runs.run_dir(run_id)

    def hook(record: dict) -> None:
        if record.get("val_loss") is not None and math.isfinite(record["val_loss"]):
            if keep.update(model, record["step"], record["val_loss"]):
                runs.save_tensors(path / BEST_FILE, {k: v.cpu().contiguous() for k, v in keep.weights.items()})
            runs.write_json_atomic(path / BEST_INFO_FILE, {"step": keep.best_step, "val_loss": keep.best_loss,
                                                           "since_best": keep.since_best})
            if keep.should_stop():
                config.max_steps = record["step"]  # the loop ends here, as at the end of its budget
        if progress:
            progress(record)

    return hook


def load_keep_best(run_id: str, patience: int | None) -> C.KeepBest:
    keep = C.KeepBest(patience)
    path = runs.run_dir(run_id)
    if (path / BEST_INFO_FILE).is_file() and (path / BEST_FILE).is_file():
        saved = runs.read_json(path / BEST_INFO_FILE)
        keep.best_step, keep.best_loss, keep.since_best = saved["step"], saved["val_loss"], saved["since_best"]
        keep.weights = runs.load_tensors(path / BEST_FILE)
    return keep


def save_final_weights(run_id: str, model, info: dict) -> None:
    """The kept weights become the run's weights; a LoRA run keeps only what it trained."""
    path = runs.run_dir(run_id)
    trained = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if info.get("lora"):
        runs.save_tensors(path / ADAPTER_FILE, trained)
        (path / "model.safetensors").unlink(missing_ok=True)  # the parent's weights are not copied
    else:
        runs.save_tensors(path / "model.safetensors", models.model_tensors(model))


def run(settings: Settings, progress=None, train_config: C.TrainConfig | None = None) -> dict:
    """The whole stage: start model → classifier → train (shared loop, best weights kept) → test →
    results.json. `train_config` replaces the recipe derived from the settings (scripts, tests)."""
    started = time.perf_counter()
    run_id = settings.run_id or runs.new_run_id("classify")
    asked = (settings.steps, settings.minutes, settings.batch_size, settings.lr, settings.eval_every, settings.warmup)
    if train_config is None and (not settings.resume or any(v is not None for v in asked)):
        train_config = settings.train_config()  # resuming with nothing new: the run's own recipe
    if settings.resume:
        model, data, info, config = _resumed_run(run_id, train_config)
    else:
        config = train_config
        model, data, info = _new_run(run_id, settings, config)
    keep = load_keep_best(run_id, info.get("patience", C.DEFAULT_PATIENCE) if settings.patience is None
                          else _patience(settings))
    device = torch.device(settings.device) if settings.device else None
    plan = snapshots.Plan((runs.open_run(run_id).config.get("snapshots") or {}).get("budget_bytes", 0), model)
    summary = train(run_id, model, C.ClassificationTask(data), config, resume=settings.resume, device=device,
                    snapshot_plan=plan, progress=keep_best_hook(run_id, model, keep, config, progress))
    stopped = bool(summary.get("stopped"))
    weights_step = summary.get("steps")
    if not stopped and keep.best_step is not None:
        keep.restore(model)
        weights_step = keep.best_step
    if not stopped:
        save_final_weights(run_id, model, info)
    results = C.final_results(model, data)
    results.update({"steps": summary.get("steps"), "stopped": stopped, "weights_step": weights_step,
                    "best_val_loss": None if keep.best_step is None else round(keep.best_loss, 5),
                    "early_stopped": bool(not stopped and keep.should_stop()),
                    "train_seconds": summary.get("seconds"),
                    "seconds": round(time.perf_counter() - started, 2)})
    runs.write_json_atomic(runs.run_dir(run_id) / RESULTS_FILE, results)
    return headline(run_id, results)


def headline(run_id: str, results: dict) -> dict:
    keys = ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss", "test_loss",
            "seconds", "steps", "weights_step", "stopped")
    return {"run_id": run_id, **{k: results.get(k) for k in keys}}


def print_progress(record: dict) -> None:
    if "train_loss" not in record:
        return
    line = f"step {record['step']:>5}  loss {record['train_loss']:.4f}"
    if "val_accuracy" in record:
        line += (f"  val loss {record['val_loss']:.4f}  val acc {record['val_accuracy']:.1%}"
                 f"  train acc {record['train_accuracy']:.1%}")
    print(line, file=sys.stderr, flush=True)


def start(settings: Settings, run_id: str, owner: str | None = None):
    return jobs.start_stage(COMMAND, settings, run_id, owner=owner)


# ---------------------------------------------------------------------------------- for the page


def results(run_id: str) -> dict | None:
    """results.json of a classifier run, or None while it has none (still training, or failed)."""
    path = runs.run_dir(run_id) / RESULTS_FILE
    return runs.read_json(path) if path.is_file() else None


read_results = results


_LOADED: dict = {}  # run id → (weights mtime, model, tokenizer, config): classify_text stays quick


def _weights_file(run: runs.Run) -> Path:
    info = run.config.get("classifier") or {}
    name = ADAPTER_FILE if info.get("lora") and (run.path / ADAPTER_FILE).is_file() else "model.safetensors"
    return run.path / name


def load_classifier_run(run_id: str):
    """(model, tokenizer, config) of a classifier run, in eval mode on the CPU."""
    run = runs.open_run(run_id)
    if run.stage != "classify":
        raise C.ClassifyError(f"Run {run_id!r} is a {run.stage!r} run, not a classifier (stage 5).")
    weights = _weights_file(run)
    if not weights.is_file():
        raise C.ClassifyError(f"Run {run_id!r} has no weights yet: it has not finished a training step.")
    mtime = weights.stat().st_mtime_ns
    cached = _LOADED.get(run_id)
    if cached and cached[0] == mtime:
        return cached[1:]
    if weights.name == ADAPTER_FILE:
        model = lora_classifier(run.config)
        tensors = runs.load_tensors(weights)
        model.lm_head.load_state_dict({k[len("lm_head."):]: v for k, v in tensors.items()
                                       if k.startswith("lm_head.")})
        lora.load_lora_tensors(model, {k: v for k, v in tensors.items() if not k.startswith("lm_head.")},
                               source=str(weights))
    else:
        model = build_classifier_from_config(run.config)
        models.load_model_weights(model, runs.load_tensors(weights), source=str(weights))
    model.eval()
    tokenizer = load_tokenizer(run.path / "tokenizer.json")
    if len(_LOADED) >= 4:
        _LOADED.clear()
    _LOADED[run_id] = (mtime, model, tokenizer, run.config)
    return model, tokenizer, run.config


def classify_message(run_id: str, text: str) -> dict:
    """Probabilities for one message, plus what happened to it on the way in.

    → {"probabilities": {"ham": p, "spam": p}, "label", "tokens", "used_tokens", "truncated"}.
    """
    if not isinstance(text, str) or not text.strip():
        raise DataError("Type a message to classify.")
    model, tokenizer, config = load_classifier_run(run_id)
    info = _classifier_info(config)
    ids = tokenizer.encode(text)
    limit = int(info["pad_length"])  # the length it was fine-tuned on (≤ the context length)
    used = ids[:limit]
    probs = C.classify_ids(model, used)
    probabilities = dict(zip(info.get("labels", list(C.LABELS)), probs))
    return {"probabilities": probabilities, "label": max(probabilities, key=probabilities.get),
            "tokens": len(ids), "used_tokens": len(used), "truncated": len(ids) > limit, "limit": limit}


def classify_text(run_id: str, text: str) -> dict[str, float]:
    """{"ham": p, "spam": p} for a message (the two add up to 1)."""
    return classify_message(run_id, text)["probabilities"]


def data_overview(source: str = "sms-spam") -> dict:
    """Raw class counts, split sizes and three training messages of each class."""
    examples = load_sms_examples(source)
    parts = C.split_examples(C.balance_classes(examples))
    samples = [{"label": C.LABELS[e.label], "message": e.text}
               for label in (0, 1) for e in [x for x in parts["train"] if x.label == label][:3]]
    raw, split = C.class_counts(examples), {k: len(v) for k, v in parts.items()}
    metrics = [("ham (raw)", f"{raw['ham']:,}"), ("spam (raw)", f"{raw['spam']:,}"), ("train", split["train"]),
               ("validation", split["val"]), ("test", split["test"])]
    return {"raw": raw, "split": split, "samples": samples, "metrics": metrics}


def misclassified_table(done: dict) -> list[dict]:
    """The wrong test messages of a results dict, as table rows."""
    return [{"true": w["label"], "predicted": w["predicted"], "P(spam)": w["p_spam"], "message": w["text"]}
            for w in done.get("misclassified", [])]


def start_runs() -> dict[str, str]:
    """Runs a classifier can start from: {run id: label}."""
    return {r.id: f"{r.id} — {r.stage}, {r.state}" for r in models.language_model_runs()}


def classifier_runs() -> list[runs.Run]:
    return [r for r in runs.list_runs("classify") if not r.error]


def run_info(run_id: str) -> dict | None:
    """What a page says about a classifier run (its classifier settings), None until it exists."""
    if not (runs.run_dir(run_id) / "config.json").is_file():
        return None
    return runs.open_run(run_id).config.get("classifier", {})


def curves(run_id: str) -> tuple[list[dict], int | None]:
    """(metrics rows, step of the weights kept so far or at the end)."""
    try:
        done = results(run_id)
    except GlassBoxError:
        done = None  # a damaged results file: the page says so below; the curves still draw
    path = runs.run_dir(run_id) / BEST_INFO_FILE
    step = done.get("weights_step") if done else (runs.read_json(path)["step"] if path.is_file() else None)
    return runs.read_jsonl(runs.run_dir(run_id) / "metrics.jsonl"), step


def expected(run_id: str, metrics: list[dict]) -> dict:
    """Expected vs yours: the reference run of this start shape and recipe (band) and the health
    checks' sentences (core.lab.references)."""
    return references.expected_vs_yours(runs.open_run(run_id).config, metrics, "classify")


def comparison(run_ids: list[str]) -> list[dict]:
    """One row per finished classifier run: where it started, what learned, its accuracies."""
    rows = []
    for run_id in run_ids:
        info, res = run_info(run_id) or {}, results(run_id) or {}
        rows.append({"run": run_id, "start": ("random: " if info.get("random_init") else "") + str(info.get("start_run")),
                     "freeze": info.get("freeze"), "steps": res.get("steps"), "kept step": res.get("weights_step"),
                     "train acc": res.get("train_accuracy"), "val acc": res.get("val_accuracy"),
                     "test acc": res.get("test_accuracy"), "test loss": res.get("test_loss")})
    return rows


def page_settings(start: str, random_init: bool, learns: str, budget: str, amount: float, batch_size: int,
                  lr: float, max_length: int, run_id: str, rank: int, alpha: float, targets) -> Settings:
    """The page's controls as Settings ("lora" as what learns turns the LoRA options on)."""
    lora_options = (dict(lora_rank=int(rank), lora_alpha=float(alpha), lora_targets=tuple(targets))
                    if learns == "lora" else {})
    return Settings(start=start, random_init=random_init, freeze=DEFAULT_FREEZE if lora_options else learns,
                    steps=int(amount) if budget == "steps" else None,
                    minutes=float(amount) if budget == "minutes" else None, batch_size=int(batch_size),
                    lr=float(lr), max_length=int(max_length) or None, run_id=run_id, **lora_options)


# ---------------------------------------------------------------------------------- what each choice costs


COSTS_CAPTION = ("**What each choice costs**, before training: the numbers that learn, the memory of their "
                 "gradients and of AdamW's two moments, and (if you ask) the time of one training step.")


def time_train_steps(model, task, config: C.TrainConfig, steps: int) -> float:
    """Seconds per optimiser step (the textbook's `train_step`), after one untimed warm-up step."""
    state, hooks = TrainState(), TrainHooks()
    inputs, targets = task.get_batch("train", 0, config.batch_size)
    model.train()
    train_step(model, task, inputs, targets, config, config.lr, state, hooks)  # builds AdamW
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, task, inputs, targets, config, config.lr, state, hooks)
    return (time.perf_counter() - started) / steps


def cost_table(builders: dict[str, Callable], task=None, config: C.TrainConfig | None = None,
               time_steps: int = 0) -> list[dict]:
    """For each way of fine-tuning (a function building its model): trainable parameters, the
    memory their gradients and AdamW's two moments take, and (when `time_steps`) the step time."""
    rows = []
    timed = bool(time_steps and task is not None)
    for name, build in builders.items():
        # Counting needs shapes only: on the meta device a 135M model is built in milliseconds and
        # takes no memory (13 s and 2 GB for SmolLM2's four choices when built for real).
        with contextlib.nullcontext() if timed else torch.device("meta"):
            model = build()
        trainable, total = C.trainable_parameters(model)
        memory = lora.training_memory(trainable)
        row = {"what learns": name, "trainable parameters": trainable, "share": trainable / max(1, total),
               "gradients (MB)": round(memory["gradients"] / 1e6, 2),
               "AdamW moments (MB)": round(memory["optimiser"] / 1e6, 2), "step time (ms)": None}
        if timed:
            row["step time (ms)"] = round(1000 * time_train_steps(model, task, config, time_steps), 1)
        rows.append(row)
        del model
    return rows


def choice_costs(start_run: str, rank: int = 8, alpha: float | None = None, targets=LORA_TARGETS,
                 batch_size: int = 16, time_steps: int = 0) -> list[dict]:
    """Stage 5's choices side by side, before training: head, last block, all weights, LoRA.
    (The weights do not change the costs, so the models are built from the run's shape alone.)"""
    run = check_start_run(start_run)
    shape = run.config["model"]

    def builder(freeze: str):
        def build():
            model = C.make_classifier(GPT(GPTConfig.from_dict(shape)), "head" if freeze == "lora" else freeze)
            if freeze == "lora":
                lora.add_lora(model, rank, alpha, targets)
                for p in model.lm_head.parameters():
                    p.requires_grad = True
            return model
        return build

    task = None
    if time_steps:
        tokenizer = load_tokenizer(run.path / "tokenizer.json")
        task = C.ClassificationTask(prepare_sms_data(tokenizer, int(shape["context_length"])))
    config = C.default_train_config(batch_size=batch_size)
    return cost_table({f: builder(f) for f in (*FREEZE_MODES, "lora")}, task, config, time_steps)


__all__ = ["GlassBoxError"]  # re-exported for the page

CODE = {
    "data": (C.balance_classes, C.split_examples, C.pad_or_truncate),
    "model": (C.make_classifier, C.classify_logits),
    "training": (C.ClassificationTask, C.KeepBest),
    "results": (C.evaluate_split, C.confusion_matrix),
    "message": (C.classify_ids, C.classify_logits),
}


def readable_results(run_id: str) -> bool:
    """True when the run has results that can be read (a damaged file is skipped, not raised)."""
    try:
        return results(run_id) is not None
    except GlassBoxError:
        return False
