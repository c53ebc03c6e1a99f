"""Stage 5 — fine-tuning a language model to classify text (spam or ham).

What the learner sees here: the smallest fine-tuning loop there is. A model that was pre-trained to
predict the next token gets a new, tiny output layer with two outputs (ham, spam) instead of one
per vocabulary entry. Because the model is causal, the *last real token* of a message has seen the
whole message, so its hidden state is the one we classify. Part of the network can stay frozen:
the pre-trained layers already turn text into useful features.

The pieces, in the order the lesson uses them:
1. Data — `parse_sms_lines` reads the UCI SMS Spam Collection (`label<TAB>text` per line),
   `balance_classes` under-samples ham to the number of spam messages, `split_examples` makes a
   70/10/20 train/validation/test split, `encode_examples` tokenises and pads or truncates.
2. Model — `make_classifier` swaps `lm_head` for `nn.Linear(n_embd, 2)` and freezes what the
   chosen `freeze` mode says; `classify_logits` reads the logits at the last real token.
3. Training — `ClassificationTask` plugs into the one training loop of stage 4 (`core.gpt.train`);
   `KeepBest` remembers the weights of the best validation loss (early stopping with patience).
4. Results — `evaluate_split`, `confusion_matrix`, `final_results`.

Reading and writing files (the data set, the run) is the stage's job: `core/stages/classify.py`.
The reference book ("Build a Large Language Model (From Scratch)", chapter 6) does the same with
GPT-2 small and reports 95.67 % test accuracy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.gpt.dataset import epoch_batch
from core.gpt.errors import DataError, GlassBoxError, ModelConfigError
from core.gpt.model import GPT, GPTConfig
from core.gpt.train import TrainConfig, TrainTask

LABELS = ("ham", "spam")  # class index = position in this tuple
DATA_SEED = 123  # the reference book's random_state for balancing and splitting
SPLIT_FRACTIONS = (0.7, 0.1)  # train, validation; the rest (0.2) is the test set
FREEZE_MODES = {
    "head": "train only the new classification head",
    "last-block": "train the head, the last transformer block and the final LayerNorm",
    "all": "train every parameter",
}
# The recipe, measured on 2 CPU cores from a 5-minute `base` run (docs/fine-tuning.md): every
# weight learning beats the last block alone (300 steps: 96.7 % vs 93.3 % test accuracy); with it
# and patience 5, `--minutes 5` kept step 120 and reached 96.7 % (1 minute: 76.3 %).
DEFAULT_FREEZE = "all"
DEFAULT_STEPS = 300  # when neither steps nor minutes are given: ~4.5 passes over the training set
DEFAULT_PATIENCE = 5  # evaluations without a better validation loss before training stops
TRAIN_ACCURACY_SUBSET = 160  # training messages scored at each evaluation (a fixed subset)
MAX_MISCLASSIFIED = 50  # misclassified test messages kept in results.json


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
    the file has stray quote characters that make pandas merge lines (5,572 rows instead of 5,574)."""
    examples = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a blank line (e.g. at the end of the file) is not a message
        parts = line.split("\t", 1)
        if len(parts) != 2:
            raise DataError(f"{source}, line {line_number}: expected 'label<TAB>message', found no "
                            f"tab in {line[:60]!r}.")
        label, message = parts[0].strip(), parts[1]
        if label not in LABELS:
            raise DataError(f"{source}, line {line_number}: unknown label {label[:30]!r} "
                            f"(expected one of {', '.join(LABELS)}).")
        examples.append(Example(message, LABELS.index(label)))
    if not examples:
        raise DataError(f"{source} holds no messages.")
    missing = [name for i, name in enumerate(LABELS) if not any(e.label == i for e in examples)]
    if missing:
        raise DataError(f"{source} has no '{missing[0]}' messages; a classifier needs both classes.")
    return examples


def class_counts(examples: list[Example]) -> dict[str, int]:
    return {name: sum(1 for e in examples if e.label == i) for i, name in enumerate(LABELS)}


def balance_classes(examples: list[Example], seed: int = DATA_SEED) -> list[Example]:
    """Under-sample every larger class to the size of the smallest (ham: 4,827 → 747 = #spam).
    A balanced set makes accuracy meaningful: on the raw data "always say ham" scores 87 %."""
    by_class = [[e for e in examples if e.label == i] for i in range(len(LABELS))]
    smallest = min(len(group) for group in by_class)
    rng = random.Random(seed)
    balanced = []
    for group in by_class:
        balanced += rng.sample(group, smallest) if len(group) > smallest else group
    return balanced


def split_examples(examples: list[Example], fractions=SPLIT_FRACTIONS,
                   seed: int = DATA_SEED) -> dict[str, list[Example]]:
    """Shuffle, then cut into train / val / test like the book: 70 % / 10 % / the rest.
    For the 1,494 balanced messages: 1,045 / 149 / 300."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    train_end = int(len(shuffled) * fractions[0])
    val_end = train_end + int(len(shuffled) * fractions[1])
    return {"train": shuffled[:train_end], "val": shuffled[train_end:val_end], "test": shuffled[val_end:]}


def pad_id_for(tokenizer) -> int:
    """Padding uses the end-of-text token (as the book does with GPT-2's 50256), or 0 if none.
    Which id we pad with does not change the prediction: the model is causal, so tokens *after*
    the last real token never influence it."""
    eot = getattr(tokenizer, "eot_id", None)
    return int(eot) if eot is not None else 0


def pad_or_truncate(ids: list[int], length: int, pad_id: int) -> tuple[list[int], int]:
    """Make `ids` exactly `length` long; return it and the index of the last real token.
    Longer messages keep their first `length` tokens. An empty message becomes one padding token
    (the index 0 then points at it), so every row has a token to classify."""
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
    return EncodedSplit(ids=torch.tensor(rows, dtype=torch.long).reshape(len(rows), length),
                        last_index=torch.tensor(last, dtype=torch.long),
                        labels=torch.tensor([e.label for e in examples], dtype=torch.long),
                        texts=[e.text for e in examples], truncated=truncated)


def choose_pad_length(train_examples: list[Example], tokenizer, context_length: int,
                      requested: int | None = None) -> int:
    """The book's rule: pad to the longest training message, but never beyond the context."""
    if requested is not None:
        if requested < 1:
            raise ClassifyError(f"--max-length must be at least 1 (got {requested}).")
        if requested > context_length:
            raise ClassifyError(f"--max-length {requested} is longer than the model's context of "
                                f"{context_length} tokens.")
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


def build_sms_data(examples: list[Example], tokenizer, context_length: int,
                   max_length: int | None = None, seed: int = DATA_SEED) -> SmsData:
    """Balance, split, choose the padded length and encode: the data of the whole stage."""
    balanced = balance_classes(examples, seed)
    parts = split_examples(balanced, seed=seed)
    pad_length = choose_pad_length(parts["train"], tokenizer, context_length, max_length)
    splits = {name: encode_examples(part, tokenizer, pad_length) for name, part in parts.items()}
    counts = {"raw": class_counts(examples), "balanced": class_counts(balanced),
              "split": {name: len(part) for name, part in parts.items()},
              "truncated": {name: s.truncated for name, s in splits.items()}}
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


def build_classifier(model_config: dict, freeze: str = DEFAULT_FREEZE,
                     num_classes: int = len(LABELS)) -> nn.Module:
    """A classifier's architecture from a run's `config["model"]` (weights not loaded)."""
    return make_classifier(GPT(GPTConfig.from_dict(model_config)), freeze, num_classes)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def classify_logits(model: nn.Module, ids: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """Class logits read at each row's last real token.
    ids: (B, T) token ids; last_index: (B,) position of the last real token → logits (B, classes).
    The model runs its ordinary forward (so a DistributedDataParallel wrapper works too): with the
    new head it scores every position, (B, T, classes); we keep the score of the one position
    that has read the whole message."""
    logits, _ = model(ids)  # (B, T, classes)
    rows = torch.arange(ids.shape[0], device=ids.device)
    return logits[rows, last_index]  # (B, classes)


@torch.no_grad()
def classify_ids(model: nn.Module, ids: list[int]) -> list[float]:
    """Class probabilities for one message's token ids (no padding needed for one message)."""
    x = torch.tensor([ids or [0]], dtype=torch.long)  # (1, T)
    logits = classify_logits(model, x, torch.tensor([x.shape[1] - 1]))  # (1, classes)
    return torch.softmax(logits[0].float(), dim=-1).tolist()


# ----------------------------------------------------------------------------------------------
# 3. Evaluation, keeping the best weights, and the task for the shared training loop
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


class KeepBest:
    """Early stopping with patience: remember the weights with the best validation loss so far.

    Fine-tuning on a small data set overfits: the training loss keeps falling while the validation
    loss turns and rises. So after each evaluation we compare, keep a copy of the weights that
    learn when the validation loss is the best yet, and stop after `patience` evaluations without
    a better one. The run then holds the best weights, not the last: a longer budget can never
    give a worse model. Evaluations at or before the best step are ignored (a resumed run repeats
    the steps after its last checkpoint and sees the same numbers again)."""

    def __init__(self, patience: int | None = DEFAULT_PATIENCE):
        self.patience = patience
        self.best_loss, self.best_step, self.since_best = math.inf, None, 0
        self.weights: dict[str, torch.Tensor] = {}  # parameter name → copy at best_step

    def update(self, model: nn.Module, step: int, val_loss: float) -> bool:
        """Record one evaluation; True when it is the best so far (its weights were copied)."""
        if self.best_step is not None and step <= self.best_step:
            return False
        if val_loss < self.best_loss:
            self.best_loss, self.best_step, self.since_best = val_loss, step, 0
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            return True
        self.since_best += 1
        return False

    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put the best weights back into the model (the frozen ones never changed)."""
        for name, p in model.named_parameters():
            if name in self.weights:
                p.copy_(self.weights[name])


class ClassificationTask(TrainTask):
    """What stage 5 plugs into the shared training loop (`core.gpt.train.train`).

    inputs  = token ids (B, T) with `last_index` (B,) packed in as the last column (B, T + 1),
              so a batch is two plain tensors the loop can move to any device;
    targets = class labels (B,)."""

    def __init__(self, data: SmsData, train_accuracy_subset: int = TRAIN_ACCURACY_SUBSET,
                 seed: int = DATA_SEED):
        self.data = data
        self.train_accuracy_subset = train_accuracy_subset
        self.seed = seed

    def batch_rows(self, split: str, step: int, batch_size: int) -> torch.Tensor:
        """Row indices of batch `step` (core.gpt.dataset.epoch_batch: the same for a resumed run)."""
        return torch.tensor(epoch_batch(len(self.data.splits[split]), step, batch_size, self.seed))

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

    def loss(self, model, inputs, targets):
        ids, last_index = self.unpack(inputs)
        logits = classify_logits(model, ids, last_index)  # (B, classes)
        return F.cross_entropy(logits, targets)

    def evaluate(self, model) -> dict[str, float]:
        val = evaluate_split(model, self.data.splits["val"])
        train = evaluate_split(model, self.data.splits["train"], limit=self.train_accuracy_subset)
        return {"val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "train_accuracy": train["accuracy"]}

    def tokens_in_batch(self, inputs) -> int:
        ids, last_index = self.unpack(inputs)
        return int((last_index + 1).sum())  # real tokens only


def default_train_config(**overrides) -> TrainConfig:
    """Fine-tuning settings: small batches, a short warm-up, frequent evaluation. A few hundred
    steps are a few passes over the 1,045 training messages (the book: 5 passes, batches of 8)."""
    values = dict(max_steps=None, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=20,
                  weight_decay=0.1, eval_every=40, eval_batches=1, sample_every=10**9,
                  checkpoint_every=100, log_every=5, seed=DATA_SEED)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["max_steps"] is None and values.get("max_minutes") is None and values.get("max_tokens") is None:
        values["max_steps"] = DEFAULT_STEPS
    return TrainConfig(**values)


def final_results(model: nn.Module, data: SmsData) -> dict:
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
                for i in wrong[:MAX_MISCLASSIFIED]]
    results.update({"pad_length": data.pad_length, "split_sizes": data.counts.get("split"),
                    "truncated": data.counts.get("truncated")})
    return results
