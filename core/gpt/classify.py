"""Stage 5 — fine-tuning a language model to classify text (spam or ham).

What the learner sees here: the smallest fine-tuning loop there is. A model that was pre-trained to
predict the next token gets a new, tiny output layer with two outputs (ham, spam) instead of one
per vocabulary entry. Because the model is causal, the *last real token* of a message has seen the
whole message, so its hidden state is the one we classify. Most of the network can stay frozen:
the pre-trained layers already turn text into useful features; we only teach a small head (and, by
default, the last transformer block) to read "spam" from them.

The pieces, in the order the lesson uses them:

1. Data — `load_sms_examples` reads the UCI SMS Spam Collection (`label<TAB>text` per line),
   `balance_classes` under-samples ham to the number of spam messages, `split_examples` makes a
   70/10/20 train/validation/test split, `encode_examples` tokenises and pads or truncates.
2. Model — `make_classifier` swaps `lm_head` for `nn.Linear(n_embd, 2)` and freezes what the
   chosen `freeze` mode says; `classify_logits` reads the logits at the last real token.
3. Training — `ClassificationTask` plugs into the one training loop of stage 4 (`core.gpt.train`).
4. Results — `evaluate_split`, `confusion_matrix`, `fine_tune` (the whole stage in one call, used by
   `python -m core classify` and the page), `classify_text` for a message the learner types.

The reference book ("Build a Large Language Model (From Scratch)", chapter 6) does the same with
GPT-2 small and reports 95.67 % test accuracy.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.lab import data as data_registry
from core.lab import runs
from core.gpt.errors import GlassBoxError, ModelConfigError
from core.lab.errors import DataError, RunError
from core.gpt.model import GPT, GPTConfig, load_model_run
from core.gpt.tokenizers import load_tokenizer
from core.gpt.train import TrainConfig, TrainTask, load_model_tensors, train

LABELS = ("ham", "spam")  # class index = position in this tuple
DATA_SEED = 123  # the reference book's random_state for balancing and splitting
SPLIT_FRACTIONS = (0.7, 0.1)  # train, validation; the rest (0.2) is the test set
FREEZE_MODES = {
    "head": "train only the new classification head",
    "last-block": "train the head, the last transformer block and the final LayerNorm",
    "all": "train every parameter",
}
DEFAULT_FREEZE = "last-block"
START_STAGES = ("pretrain", "import")  # runs that hold a language model we can start from
RANDOM_PREFIX = "random:"  # `--from random:RUN` = RUN's architecture and tokeniser, fresh weights
TRAIN_ACCURACY_SUBSET = 160  # training messages scored at each evaluation (a fixed subset)
MAX_MISCLASSIFIED = 50  # misclassified test messages kept in results.json
DEFAULT_STEPS = 300  # when neither steps nor minutes are given: ~4.5 passes over the training set


class ClassifyError(GlassBoxError):
    """Fine-tuning for classification cannot start as asked (wrong start run, bad settings...)."""


# ----------------------------------------------------------------------------------------------
# 1. Data
# ----------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One SMS message and its class index (0 = ham, 1 = spam)."""

    text: str
    label: int


def parse_sms_lines(text: str, source: str = "SMSSpamCollection") -> list[Example]:
    """Parse `label<TAB>message` lines. A plain line split (not a CSV reader) keeps every message:
    the file has stray quote characters that make pandas merge lines (5,572 rows instead of 5,574).
    """
    examples = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a blank line (e.g. at the end of the file) is not a message
        parts = line.split("\t", 1)
        if len(parts) != 2:
            raise DataError(
                f"{source}, line {line_number}: expected 'label<TAB>message', found no tab "
                f"in {line[:60]!r}."
            )
        label, message = parts[0].strip(), parts[1]
        if label not in LABELS:
            raise DataError(
                f"{source}, line {line_number}: unknown label {label[:30]!r} "
                f"(expected one of {', '.join(LABELS)})."
            )
        examples.append(Example(message, LABELS.index(label)))
    if not examples:
        raise DataError(f"{source} holds no messages.")
    missing = [name for i, name in enumerate(LABELS) if not any(e.label == i for e in examples)]
    if missing:
        raise DataError(f"{source} has no '{missing[0]}' messages; a classifier needs both classes.")
    return examples


def load_sms_examples(source: str = "sms-spam") -> list[Example]:
    """Read the messages of a data source: a registry name (`sms-spam`), `upload:<name>` or
    `file:<path>` (the registry checks the file and says how to get it when it is missing)."""
    registered = data_registry.SOURCES.get(source)
    if registered is not None and registered.kind != "sms":
        raise DataError(
            f"{source!r} is not a labelled SMS data set (it is {registered.kind!r} data); "
            "use --data sms-spam."
        )
    label = source.split(":", 1)[1] if source.startswith(("upload:", "file:")) else source
    return parse_sms_lines(data_registry.read_text(source), source=Path(label).name)


def class_counts(examples: list[Example]) -> dict[str, int]:
    return {name: sum(1 for e in examples if e.label == i) for i, name in enumerate(LABELS)}


def balance_classes(examples: list[Example], seed: int = DATA_SEED) -> list[Example]:
    """Under-sample every larger class to the size of the smallest (ham: 4,827 → 747 = #spam).

    A balanced set makes accuracy meaningful: on the raw data "always say ham" scores 87 %.
    """
    by_class = [[e for e in examples if e.label == i] for i in range(len(LABELS))]
    smallest = min(len(group) for group in by_class)
    rng = random.Random(seed)
    balanced = []
    for group in by_class:
        balanced += rng.sample(group, smallest) if len(group) > smallest else group
    return balanced


def split_examples(
    examples: list[Example], fractions=SPLIT_FRACTIONS, seed: int = DATA_SEED
) -> dict[str, list[Example]]:
    """Shuffle, then cut into train / val / test like the book: 70 % / 10 % / the rest.

    For the 1,494 balanced messages: 1,045 / 149 / 300.
    """
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    train_end = int(len(shuffled) * fractions[0])
    val_end = train_end + int(len(shuffled) * fractions[1])
    return {"train": shuffled[:train_end], "val": shuffled[train_end:val_end], "test": shuffled[val_end:]}


def pad_id_for(tokenizer) -> int:
    """Padding uses the end-of-text token (as the book does with GPT-2's 50256), or 0 if none.

    Which id we pad with does not change the prediction: the model is causal, so tokens *after*
    the last real token never influence it.
    """
    eot = getattr(tokenizer, "eot_id", None)
    return int(eot) if eot is not None else 0


def pad_or_truncate(ids: list[int], length: int, pad_id: int) -> tuple[list[int], int]:
    """Make `ids` exactly `length` long; return it and the index of the last real token.

    Longer messages keep their first `length` tokens. An empty message becomes one padding token
    (the index 0 then points at it), so every row has a token to classify.
    """
    if length < 1:
        raise ClassifyError("The padded length must be at least 1 token.")
    real = list(ids[:length]) or [pad_id]
    last_index = len(real) - 1
    return real + [pad_id] * (length - len(real)), last_index


@dataclass
class EncodedSplit:
    """A split as tensors: token ids `(N, T)`, last real token `(N,)`, labels `(N,)`, texts."""

    ids: torch.Tensor
    last_index: torch.Tensor
    labels: torch.Tensor
    texts: list[str]
    truncated: int = 0  # how many messages were longer than the padded length

    def __len__(self) -> int:
        return len(self.texts)


def encode_examples(examples: list[Example], tokenizer, length: int) -> EncodedSplit:
    pad_id = pad_id_for(tokenizer)
    rows, last, truncated = [], [], 0
    for example in examples:
        ids = tokenizer.encode(example.text)
        truncated += len(ids) > length
        padded, last_index = pad_or_truncate(ids, length, pad_id)
        rows.append(padded)
        last.append(last_index)
    return EncodedSplit(
        ids=torch.tensor(rows, dtype=torch.long).reshape(len(rows), length),
        last_index=torch.tensor(last, dtype=torch.long),
        labels=torch.tensor([e.label for e in examples], dtype=torch.long),
        texts=[e.text for e in examples],
        truncated=truncated,
    )


def choose_pad_length(train_examples: list[Example], tokenizer, context_length: int,
                      requested: int | None = None) -> int:
    """The book's rule: pad to the longest training message, but never beyond the context."""
    if requested is not None:
        if requested < 1:
            raise ClassifyError(f"--max-length must be at least 1 (got {requested}).")
        if requested > context_length:
            raise ClassifyError(
                f"--max-length {requested} is longer than the model's context of "
                f"{context_length} tokens."
            )
        return int(requested)
    longest = max(len(tokenizer.encode(e.text)) for e in train_examples)
    return max(1, min(longest, context_length))


@dataclass
class SmsData:
    """Everything the classifier trains and is tested on, ready as tensors."""

    splits: dict[str, EncodedSplit]
    pad_length: int
    pad_id: int
    counts: dict = field(default_factory=dict)  # raw and balanced class counts, split sizes


def prepare_sms_data(tokenizer, context_length: int, source: str = "sms-spam",
                     max_length: int | None = None, seed: int = DATA_SEED) -> SmsData:
    examples = load_sms_examples(source)
    balanced = balance_classes(examples, seed)
    parts = split_examples(balanced, seed=seed)
    pad_length = choose_pad_length(parts["train"], tokenizer, context_length, max_length)
    splits = {name: encode_examples(part, tokenizer, pad_length) for name, part in parts.items()}
    counts = {
        "raw": class_counts(examples),
        "balanced": class_counts(balanced),
        "split": {name: len(part) for name, part in parts.items()},
        "truncated": {name: s.truncated for name, s in splits.items()},
    }
    return SmsData(splits, pad_length, pad_id_for(tokenizer), counts)


# ----------------------------------------------------------------------------------------------
# 2. Model: a classification head on the last real token
# ----------------------------------------------------------------------------------------------


def _blocks_and_final_norm(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """Find the transformer blocks and the final LayerNorm, whatever the model calls them."""
    holder = getattr(model, "transformer", model)  # nanoGPT nests them in `transformer`
    blocks = next((getattr(holder, n) for n in ("blocks", "h", "trf_blocks", "layers")
                   if isinstance(getattr(holder, n, None), nn.ModuleList)), None)
    norm = next((getattr(holder, n) for n in ("ln_f", "final_norm", "norm_f", "norm")
                 if isinstance(getattr(holder, n, None), nn.Module)), None)
    if blocks is None or norm is None:
        raise ModelConfigError("This model has no transformer blocks / final norm to unfreeze.")
    return blocks, norm


def set_freeze_mode(model: nn.Module, freeze: str) -> None:
    """Choose which parameters learn. The new head always learns."""
    if freeze not in FREEZE_MODES:
        raise ClassifyError(f"Unknown freeze mode {freeze!r}; choose one of {', '.join(FREEZE_MODES)}.")
    for p in model.parameters():
        p.requires_grad = freeze == "all"
    for p in model.lm_head.parameters():
        p.requires_grad = True
    if freeze == "last-block":
        blocks, final_norm = _blocks_and_final_norm(model)
        for p in list(blocks[-1].parameters()) + list(final_norm.parameters()):
            p.requires_grad = True


def make_classifier(model: nn.Module, freeze: str = DEFAULT_FREEZE,
                    num_classes: int = len(LABELS), seed: int = DATA_SEED) -> nn.Module:
    """Replace the language-model head (n_embd → vocab) by a classifier (n_embd → num_classes)."""
    n_embd = model.config.n_embd
    torch.manual_seed(seed)  # the new head starts from the same numbers every time
    model.lm_head = nn.Linear(n_embd, num_classes)  # (B, C) → (B, num_classes); untied from wte
    set_freeze_mode(model, freeze)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def classify_logits(model: nn.Module, ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """Class logits read at each row's last real token.

    ids: (B, T) token ids; last_index: (B,) position of the last real token → logits (B, classes).
    The model runs its ordinary forward (so a DistributedDataParallel wrapper works too): with the
    new head it scores every position, (B, T, classes); we keep the score of the one position
    that has read the whole message.
    """
    logits, _ = model(ids)  # (B, T, classes)
    rows = torch.arange(ids.shape[0], device=ids.device)
    return logits[rows, last_index]  # (B, classes)


# ----------------------------------------------------------------------------------------------
# 3. Evaluation and the task for the shared training loop
# ----------------------------------------------------------------------------------------------


def _trim(ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """Drop padding columns no row needs: a causal model's answer at `last_index` does not depend
    on anything after it, so a batch of short messages runs on a short tensor (much faster)."""
    return ids[:, : int(last_index.max()) + 1]


@torch.no_grad()
def predict_split(model: nn.Module, split: EncodedSplit, batch_size: int = 64,
                  limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits for (the first `limit` rows of) a split → (logits (N, classes), labels (N,))."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(split) if limit is None else min(limit, len(split))
    # Sort by length so each batch is trimmed to similar lengths, then restore the order.
    order = torch.argsort(split.last_index[:n])
    logits = torch.empty(n, model.lm_head.out_features)
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        last = split.last_index[rows]
        ids = _trim(split.ids[rows], last)
        logits[rows] = classify_logits(model, ids.to(device), last.to(device)).float().cpu()
    model.train(was_training)
    return logits, split.labels[:n]


def evaluate_split(model: nn.Module, split: EncodedSplit, limit: int | None = None) -> dict:
    """Loss and accuracy of the model on a split (or its first `limit` messages)."""
    logits, labels = predict_split(model, split, limit=limit)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor,
                     num_classes: int = len(LABELS)) -> list[list[int]]:
    """matrix[true][predicted] = how many messages of class `true` were predicted `predicted`."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(labels.tolist(), predictions.tolist()):
        matrix[t][p] += 1
    return matrix


class ClassificationTask(TrainTask):
    """What stage 5 plugs into the shared training loop (`core.gpt.train.train`).

    inputs  = token ids (B, T) with `last_index` (B,) packed in as the last column (B, T + 1),
              so a batch is two plain tensors the loop can move to any device;
    targets = class labels (B,).
    """

    def __init__(self, data: SmsData, train_accuracy_subset: int = TRAIN_ACCURACY_SUBSET,
                 seed: int = DATA_SEED):
        self.data = data
        self.train_accuracy_subset = train_accuracy_subset
        self.seed = seed

    # -- batches ---------------------------------------------------------------------------------
    def batch_rows(self, split: str, step: int, batch_size: int) -> torch.Tensor:
        """Row indices of batch `step`: passes (epochs) over the split, each in a fresh shuffled
        order that depends only on (seed, epoch) — so a resumed run sees exactly the same batches."""
        n = len(self.data.splits[split])
        batch_size = min(batch_size, n)
        per_epoch = n // batch_size  # drop the ragged last batch, as the book's loader does
        epoch, position = divmod(step, per_epoch)
        shuffle = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=shuffle)
        return order[position * batch_size:(position + 1) * batch_size]

    def get_batch(self, split, step, batch_size, generator=None):
        split_name = "train" if split == "train" else "val"
        rows = self.batch_rows(split_name, step, batch_size)
        s = self.data.splits[split_name]
        last = s.last_index[rows]
        ids = _trim(s.ids[rows], last)  # (B, T')
        inputs = torch.cat([ids, last[:, None]], dim=1)  # (B, T' + 1): ids then last_index
        return inputs, s.labels[rows]

    @staticmethod
    def unpack(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs[:, :-1], inputs[:, -1]

    # -- loss and metrics ------------------------------------------------------------------------
    def loss(self, model, inputs, targets):
        ids, last_index = self.unpack(inputs)
        logits = classify_logits(model, ids, last_index)  # (B, classes)
        return F.cross_entropy(logits, targets)

    def evaluate(self, model) -> dict[str, float]:
        val = evaluate_split(model, self.data.splits["val"])
        train = evaluate_split(model, self.data.splits["train"], limit=self.train_accuracy_subset)
        return {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "train_accuracy": train["accuracy"]}

    def sample(self, model):
        return None  # a classifier has no text to sample

    def tokens_in_batch(self, inputs) -> int:
        ids, last_index = self.unpack(inputs)
        return int((last_index + 1).sum())  # real tokens only


# ----------------------------------------------------------------------------------------------
# 4. Runs: start model, the whole fine-tuning, results, and classifying new text
# ----------------------------------------------------------------------------------------------


def default_train_config(**overrides) -> TrainConfig:
    """Fine-tuning settings: small batches, a short warm-up, frequent evaluation.

    A few hundred steps are a few passes over the 1,045 training messages (the book trains
    GPT-2 small for 5 passes with batches of 8).
    """
    values = dict(max_steps=None, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=20,
                  weight_decay=0.1, eval_every=40, eval_batches=1, sample_every=10**9,
                  checkpoint_every=100, log_every=5, seed=DATA_SEED)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["max_steps"] is None and values.get("max_minutes") is None and values.get("max_tokens") is None:
        values["max_steps"] = DEFAULT_STEPS
    return TrainConfig(**values)


def parse_start(spec: str, random_init: bool = False) -> tuple[str, bool]:
    """`RUN` → (RUN, random_init); `random:RUN` → (RUN, True): RUN's shape, fresh weights."""
    spec = (spec or "").strip()
    if spec.startswith(RANDOM_PREFIX):
        return spec[len(RANDOM_PREFIX):], True
    if not spec:
        raise ClassifyError("Name the run to start from: --from RUN (a stage-4 or imported GPT-2 run).")
    return spec, bool(random_init)


def check_start_run(run_id: str):
    """The run to start from must hold a language model: a stage-4 run or an imported GPT-2."""
    run = runs.open_run(run_id)  # RunNotFoundError names the run
    if run.error:
        raise RunError(run.error)
    if run.stage not in START_STAGES:
        raise ClassifyError(
            f"Run {run_id!r} is a {run.stage!r} run. Fine-tuning starts from a language model: a "
            "pre-trained run from stage 4 ('pretrain') or imported GPT-2 weights ('import')."
        )
    if "model" not in run.config:
        raise ClassifyError(f"Run {run_id!r} has no model yet (its config.json has no 'model').")
    if not run.has_weights():
        raise ClassifyError(f"Run {run_id!r} has no weights yet: let it train (or resume it) first.")
    return run


def load_start_model(run_id: str, random_init: bool = False, seed: int = DATA_SEED):
    """(model, tokenizer) to start from: the run's trained weights, or fresh random ones in the
    same shape with the same tokeniser (the control experiment: what does pre-training buy?)."""

    run = check_start_run(run_id)
    if not random_init:
        model, tokenizer, _ = load_model_run(run_id)
        return model, tokenizer
    tokenizer_path = run.path / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ClassifyError(f"Run {run_id!r} has no tokenizer.json to encode the messages with.")
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_dict(run.config["model"])), load_tokenizer(tokenizer_path)


def _classifier_info(run_config: dict) -> dict:
    info = run_config.get("classifier")
    if not isinstance(info, dict) or "pad_length" not in info:
        raise RunError("This run is not a finished classifier set-up (config.json has no 'classifier').")
    return info


def build_classifier_from_config(run_config: dict) -> nn.Module:
    """The classifier's architecture from its config.json (weights not loaded)."""

    info = _classifier_info(run_config)
    model = GPT(GPTConfig.from_dict(run_config["model"]))
    return make_classifier(model, freeze=info.get("freeze", DEFAULT_FREEZE),
                           num_classes=len(info.get("labels", LABELS)))


def fine_tune(run_id: str, start: str | None = None, data_source: str = "sms-spam",
              freeze: str = DEFAULT_FREEZE, random_init: bool = False, max_length: int | None = None,
              train_config=None, resume: bool = False, device=None, progress=None) -> dict:
    """The whole stage: start model → classifier → train (shared loop) → test → results.json.

    Returns the headline figures (what `python -m core classify` prints).
    """

    started = time.perf_counter()
    path = runs.run_dir(run_id)
    stored = runs.read_json(path / "config.json") if resume and (path / "config.json").exists() else None
    if train_config is None:  # resuming with no new settings: the run's own
        train_config = (TrainConfig.from_dict(stored["train"]) if stored and "train" in stored
                        else default_train_config())
    if stored is not None:
        # Resume: rebuild exactly what was trained from the run itself (the start run is not needed).
        if stored.get("stage") != "classify":
            raise ClassifyError(f"Run {run_id!r} is a {stored.get('stage')!r} run, not a classifier.")
        info = _classifier_info(stored)
        tokenizer = load_tokenizer(path / "tokenizer.json")
        model = build_classifier_from_config(stored)
        data = prepare_sms_data(tokenizer, model.config.context_length, info.get("data", data_source),
                                max_length=info["pad_length"])
        runs.update_config(run_id, train=train_config.to_dict())  # a resume may extend the budget
    else:
        if freeze not in FREEZE_MODES:
            raise ClassifyError(f"Unknown freeze mode {freeze!r}; choose one of {', '.join(FREEZE_MODES)}.")
        start_run, random_init = parse_start(start, random_init)
        runs.validate_run_id(run_id)
        if (path / "config.json").exists():
            raise runs.RunExistsError(f"A run named {run_id!r} already exists: choose another name.")
        base, tokenizer = load_start_model(start_run, random_init)
        data = prepare_sms_data(tokenizer, base.config.context_length, data_source, max_length)
        model = make_classifier(base, freeze)
        trainable, total = trainable_parameters(model)
        info = {"labels": list(LABELS), "num_classes": len(LABELS), "freeze": freeze,
                "random_init": random_init, "start_run": start_run, "data": data_source,
                "pad_length": data.pad_length, "pad_id": data.pad_id, "data_seed": DATA_SEED,
                "counts": data.counts, "trainable_parameters": trainable, "parameters": total}
        runs.create_run(run_id, "classify", {"model": base.config.to_dict(), "classifier": info,
                                             "tokenizer": getattr(tokenizer, "kind", None),
                                             "train": train_config.to_dict()},
                        parent=start_run, resume=resume)
        tokenizer.save(path / "tokenizer.json")

    # Outside a background job (a shell, a script, a test) this call records the run's state
    # itself, resumes included; inside a job, the job runner does.
    standalone = os.environ.get(runs.JOB_RUN_ID_ENV) != run_id
    if standalone:
        runs.write_status(run_id, "running", message="Fine-tuning from the command line.",
                          pid=os.getpid(), pid_start=runs.process_start(os.getpid()), error=None)
    try:
        task = ClassificationTask(data)
        summary = train(run_id, model, task, train_config, resume=resume, device=device, progress=progress)
        results = final_results(model, data, summary)
        results["train_seconds"] = summary.get("seconds")
        results["seconds"] = round(time.perf_counter() - started, 2)  # this command, end to end
        runs.write_json_atomic(path / "results.json", results)
    except BaseException as exc:
        if standalone:
            runs.write_status(run_id, "failed", error=str(exc), message=str(exc))
        raise
    if standalone:
        state = "stopped" if summary.get("stopped") else "finished"
        runs.clear_stop(run_id)
        runs.write_status(run_id, state, message=state.capitalize() + ".", result=headline(run_id, results))
    return headline(run_id, results)


def final_results(model: nn.Module, data: SmsData, summary: dict) -> dict:
    """Loss and accuracy on every split, the confusion matrix and the misclassified test messages."""
    results: dict = {"labels": list(LABELS)}
    for name, split in data.splits.items():
        logits, labels = predict_split(model, split)
        results[f"{name}_loss"] = round(F.cross_entropy(logits, labels).item(), 5)
        results[f"{name}_accuracy"] = round((logits.argmax(-1) == labels).float().mean().item(), 5)
        if name == "test":
            probs = torch.softmax(logits, dim=-1)
            predicted = probs.argmax(-1)
            results["confusion_matrix"] = confusion_matrix(labels, predicted)
            wrong = (predicted != labels).nonzero().flatten().tolist()
            results["misclassified_count"] = len(wrong)
            results["misclassified"] = [
                {"text": split.texts[i], "label": LABELS[int(labels[i])],
                 "predicted": LABELS[int(predicted[i])], "p_spam": round(float(probs[i, 1]), 4)}
                for i in wrong[:MAX_MISCLASSIFIED]
            ]
    results.update({"steps": summary.get("steps"), "stopped": bool(summary.get("stopped")),
                    "pad_length": data.pad_length, "split_sizes": data.counts.get("split"),
                    "truncated": data.counts.get("truncated")})
    return results


def headline(run_id: str, results: dict) -> dict:
    keys = ("train_accuracy", "val_accuracy", "test_accuracy", "train_loss", "val_loss", "test_loss",
            "seconds", "steps", "stopped")
    return {"run_id": run_id, **{k: results.get(k) for k in keys}}


def read_results(run_id: str) -> dict | None:
    """results.json of a classifier run, or None while it has none (still training, or failed)."""
    path = runs.run_dir(run_id) / "results.json"
    return runs.read_json(path) if path.is_file() else None


_LOADED: dict = {}  # run id → (weights mtime, model, tokenizer, config): classify_text stays quick


def load_classifier_run(run_id: str):
    """(model, tokenizer, config) of a classifier run, in eval mode on the CPU."""

    run = runs.open_run(run_id)
    if run.stage != "classify":
        raise ClassifyError(f"Run {run_id!r} is a {run.stage!r} run, not a classifier (stage 5).")
    weights = run.path / "model.safetensors"
    if not weights.is_file():
        raise ClassifyError(f"Run {run_id!r} has no weights yet: it has not finished a training step.")
    mtime = weights.stat().st_mtime_ns
    cached = _LOADED.get(run_id)
    if cached and cached[0] == mtime:
        return cached[1:]
    model = build_classifier_from_config(run.config)
    load_model_tensors(model, runs.load_tensors(weights))
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
    x = torch.tensor([used], dtype=torch.long)  # (1, T): no padding needed for one message
    with torch.no_grad():
        logits = classify_logits(model, x, torch.tensor([len(used) - 1]))  # (1, classes)
    probs = torch.softmax(logits[0].float(), dim=-1).tolist()
    labels = info.get("labels", list(LABELS))
    probabilities = {label: p for label, p in zip(labels, probs)}
    return {"probabilities": probabilities, "label": max(probabilities, key=probabilities.get),
            "tokens": len(ids), "used_tokens": len(used), "truncated": len(ids) > limit,
            "limit": limit}


def classify_text(run_id: str, text: str) -> dict[str, float]:
    """{"ham": p, "spam": p} for a message (the two add up to 1)."""
    return classify_message(run_id, text)["probabilities"]
