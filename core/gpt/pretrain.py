"""Stage 4's task: next-token prediction on one long stream of token ids.

Pre-training is the simplest task there is. Cut a random window of `T + 1` tokens out of the
corpus; the model reads the first `T` and must guess, at every position, the token that follows:

    window  : 40  367  2885  1464  1807
    inputs  : 40  367  2885  1464          (B, T)
    targets :     367  2885  1464  1807    (B, T) = inputs shifted left by one

The loss is the cross-entropy of those guesses: ln(V) for a model that knows nothing (every token
equally likely), falling as it learns spelling, then words, then style. The last `val_fraction`
of the corpus is held out; the validation loss on it, measured on the same fixed windows every
time, shows whether the model learns the language or only memorises its training text.
"""

from __future__ import annotations

import array

import torch
import torch.nn.functional as F

from core.gpt.dataset import SlidingWindowDataset, split_ids
from core.gpt.errors import TrainingError
from core.gpt.train import TrainConfig, TrainTask

# Training settings that suit each model preset (the CLI and page 4 start from these).
# `small` (2 blocks × 192, context 64) is tuned to reach validation loss ≤ 1.88 on Tiny Shakespeare
# characters in about half a minute on a 2-core CPU (nanoGPT's CPU recipe, 4 × 128 at batch 12 and
# lr 1e-3, needs ~145 s). What got there, measured here:
# - a peak learning rate well above nanoGPT's (for 3 × 128: 2e-3 gave val 2.04 after 1M tokens, 5e-3
#   1.94, 1e-2 worse again; for 2 × 192 after 500 steps: 3e-3 1.890, 4e-3 1.868, 5e-3 1.846, 6e-3
#   1.855), a 30-step warm-up and a cosine that ends exactly where the budget does;
# - batch 32 (~1.4× the tokens/s of batch 12; batch 16 learnt no more per token);
# - the shape. Same 36 s of training: 3 × 128 (700 steps, 40k tokens/s) reached 1.854 and
#   2 × 192 (540 steps, 32-35k tokens/s) 1.853; after 90 s, 1.680 vs 1.673. Equal learning per
#   second, but 2 × 192 keeps the CPU's multipliers busier (MFU 0.63-0.65 vs 0.53-0.55), so
#   it gets there in fewer, larger steps. Light weight decay (0.01); few evaluations.
# Val loss 1.846 after 500 steps (1.02M tokens, deterministic): 31.8 s of training, 33.7 s wall.
RECIPES: dict[str, dict] = {
    "tiny": dict(max_steps=300, batch_size=32, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                 eval_every=50, eval_batches=8, sample_every=100, checkpoint_every=100, log_every=10),
    "small": dict(max_steps=500, batch_size=32, lr=5e-3, min_lr=5e-4, warmup_steps=30,
                  weight_decay=0.01, eval_every=250, eval_batches=10, sample_every=250,
                  checkpoint_every=250, log_every=10),
    # the start of stages 5 and 6: context 256 of our BPE tokens (~600 characters). Measured here:
    # 5 minutes = 1,727 steps, 7.1M tokens, val loss 3.58 per BPE token (from ln 1000 = 6.9); measured
    # earlier with the tanh GELU, on a busier machine: 954 steps and 3.87. Stage 5 from it, `--freeze all`,
    # 300 steps: 97.0 % test accuracy (97.3 % from the older start)
    "base": dict(max_minutes=5.0, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                 weight_decay=0.1, eval_every=100, eval_batches=8, sample_every=200,
                 checkpoint_every=200, log_every=5),
}
RECIPES["modern"] = RECIPES["base"]  # the same shape with the modern block: same recipe, a fair comparison
DEFAULT_RECIPE = dict(max_minutes=3.0, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=50,
                      eval_every=100, eval_batches=8, sample_every=200, checkpoint_every=200, log_every=5)


# A long context wants dense tokens: our BPE packs ~2.5–3 characters per token, so 256 positions
# see ~700 characters (a character model at context 256 sat on a loss plateau near 2.5 for minutes).
PRESET_TOKENIZERS = {"base": "bpe:1000", "modern": "bpe:1000"}


def default_tokenizer(preset: str) -> str:
    return PRESET_TOKENIZERS.get(preset, "char")


def recipe(preset: str) -> dict:
    """The training defaults for a model preset (a copy: change it freely)."""
    return dict(RECIPES.get(preset, DEFAULT_RECIPE))


# ---------------------------------------------------------------------------- encoding


def ids_tensor(ids) -> torch.Tensor:
    """A flat int64 tensor of token ids (through a C array: ~4× faster than torch.tensor(list))."""
    return torch.frombuffer(array.array("q", ids), dtype=torch.int64) if len(ids) else torch.zeros(0, dtype=torch.long)


def encode_corpus(tokenizer, text: str) -> torch.Tensor:
    """The corpus as one long tensor of token ids, shape (N,)."""
    return ids_tensor(tokenizer.encode(text))


# ---------------------------------------------------------------------------- the task


class LanguageModelTask(TrainTask):
    """Random windows from the training ids; validation loss on fixed windows; a text sample."""

    def __init__(self, ids, context_length: int, val_fraction: float = 0.1, tokenizer=None,
                 sample_prompt: str | None = "\n", sample_tokens: int = 200,
                 sample_temperature: float = 0.8, sample_top_k: int | None = None):
        ids = ids if torch.is_tensor(ids) else ids_tensor(ids)
        if ids.dim() != 1:
            raise TrainingError("The corpus must be one flat list of token ids.")
        if not isinstance(context_length, int) or context_length < 1:
            raise TrainingError(f"The context length must be a whole number ≥ 1 (got {context_length!r}).")
        self.context_length = context_length
        self.train_ids, self.val_ids = split_ids(ids.long(), val_fraction)
        for name, part in (("training", self.train_ids), ("validation", self.val_ids)):
            if len(part) < context_length + 1:
                raise TrainingError(
                    f"The {name} part of the corpus has {len(part):,} tokens, fewer than one window of "
                    f"{context_length + 1:,} (context {context_length:,} + 1). Use a longer corpus, a "
                    "shorter context, or a tokeniser that makes more tokens."
                )
        self.tokenizer = tokenizer
        self.sample_prompt = sample_prompt
        self.sample_tokens = sample_tokens
        self.sample_temperature = sample_temperature
        self.sample_top_k = sample_top_k
        self._offsets = torch.arange(context_length + 1)  # (T + 1,)

    # -- what train() asks
    def check(self, config: TrainConfig) -> None:
        one_batch = config.batch_size * self.context_length
        if len(self.train_ids) < one_batch:
            raise TrainingError(
                f"The corpus has {len(self.train_ids):,} training tokens, fewer than one batch of "
                f"{config.batch_size} × {self.context_length} = {one_batch:,} tokens. Use a longer "
                "corpus, a smaller batch or a shorter context."
            )

    def windows(self, data: torch.Tensor, starts: torch.Tensor):
        """Inputs and targets (B, T) for windows beginning at `starts` (B,)."""
        chunk = data[starts.unsqueeze(1) + self._offsets]  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def get_batch(self, split: str, step: int, batch_size: int, generator: torch.Generator):
        data = self.train_ids if split == "train" else self.val_ids
        starts = torch.randint(len(data) - self.context_length, (batch_size,), generator=generator)
        return self.windows(data, starts)

    def validation_windows(self) -> SlidingWindowDataset:
        """Fixed, evenly spaced windows over the validation text (stage 1's sliding windows, with a
        stride that gives about `eval_batches × batch_size` of them): the same ones at every
        evaluation, so the validation curve moves only because the model changes."""
        config = self.config or TrainConfig(max_steps=1)
        wanted = config.eval_batches * config.batch_size
        last_start = len(self.val_ids) - self.context_length - 1
        stride = max(1, last_start // max(1, wanted - 1)) if last_start > 0 else 1
        return SlidingWindowDataset(self.val_ids, self.context_length, stride)

    def validation_starts(self) -> torch.Tensor:
        """Where each validation window begins."""
        config = self.config or TrainConfig(max_steps=1)
        windows = self.validation_windows()
        return torch.arange(min(len(windows), config.eval_batches * config.batch_size)) * windows.stride

    def evaluate(self, model) -> dict[str, float]:
        device = next(model.parameters()).device
        windows, starts = self.validation_windows(), self.validation_starts()
        batch = 2 * (self.config.batch_size if self.config else 32)  # no gradients: twice the batch fits
        total, count = 0.0, 0
        for i in range(0, len(starts), batch):
            x, y = (torch.stack(part) for part in zip(*(windows[j] for j in range(i, min(i + batch, len(starts))))))
            logits, _ = model(x.to(device))
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.to(device).reshape(-1),
                                   reduction="sum")
            total += loss.item()
            count += y.numel()
        return {"val_loss": total / count}

    def prompt_ids(self) -> list[int]:
        if self.tokenizer is not None and self.sample_prompt:
            try:
                ids = self.tokenizer.encode(self.sample_prompt)
                if ids:
                    return ids[-self.context_length:]
            except Exception:
                pass
        eot = getattr(self.tokenizer, "eot_id", None)
        return [eot if eot is not None else int(self.train_ids[0])]

    def sample(self, model) -> str | None:
        if self.tokenizer is None or not hasattr(model, "generate"):
            return None
        device = next(model.parameters()).device
        idx = torch.tensor([self.prompt_ids()], dtype=torch.long, device=device)  # (1, P)
        out = model.generate(idx, self.sample_tokens, temperature=self.sample_temperature,
                             top_k=self.sample_top_k)
        return self.tokenizer.decode(out[0].tolist())
