"""Stage 1: from one long list of token ids to (input, target) training pairs.

A language model learns to predict the next token. Slide a window of ``context_length`` ids along
the corpus; the target is the same window moved one token to the right, so every position in the
window is a small exercise: "given the tokens up to here, what comes next?"

    ids     : 40  367  2885  1464  1807  3619  402  271
    input   : 40  367  2885  1464            (context_length = 4)
    target  :     367  2885  1464  1807      (the input shifted by one)

``stride`` is how far the window moves each time: ``stride == context_length`` gives windows that
touch without overlapping (each token is predicted once per epoch); a smaller stride overlaps.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from core.gpt.errors import DataError


def _as_id_tensor(ids) -> torch.Tensor:
    """A flat LongTensor of ids; floats, text or nested lists are refused (never silently cut)."""
    if not isinstance(ids, torch.Tensor):
        try:
            ids = list(ids)
            ids = torch.tensor(ids) if ids else torch.zeros(0, dtype=torch.long)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise DataError("Token ids must be a flat list of whole numbers.") from None
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise DataError("Token ids must be a flat list of whole numbers.")
    return ids.long()


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"The {name} must be a whole number of at least 1, not {value!r}.")
    return value


class SlidingWindowDataset(Dataset):
    """Window ``i`` is ``ids[i*stride : i*stride + context_length]`` and its target, shifted by one.

    Each item is ``(input, target)``, two ``LongTensor``s of shape ``(context_length,)``.
    """

    def __init__(self, ids: Sequence[int] | torch.Tensor, context_length: int, stride: int | None = None):
        self.context_length = _check_positive_int(context_length, "context length")
        self.stride = _check_positive_int(stride if stride is not None else context_length, "stride")
        self.ids = _as_id_tensor(ids)  # (N,)
        # a window needs context_length inputs plus one more token for the last target
        if len(self.ids) < self.context_length + 1:
            raise DataError(
                f"The text is {len(self.ids):,} tokens long, too short for a context of "
                f"{self.context_length:,} tokens (it needs at least {self.context_length + 1:,}). "
                "Use more text or a shorter context."
            )
        self.n_windows = (len(self.ids) - self.context_length - 1) // self.stride + 1

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.n_windows <= i < self.n_windows:
            raise IndexError(i)
        start = (i % self.n_windows) * self.stride
        chunk = self.ids[start : start + self.context_length + 1]  # (T + 1,)
        return chunk[:-1], chunk[1:]  # input (T,), target (T,)


def split_ids(ids, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``1 - val_fraction`` of the ids for training, the rest for validation.

    A cut (not a random shuffle of windows) keeps validation text unseen: overlapping windows
    would otherwise leak the same sentences into both halves.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not (
        0.0 < val_fraction < 1.0
    ):
        raise DataError(f"The validation fraction must be between 0 and 1 (exclusive), not {val_fraction!r}.")
    ids = _as_id_tensor(ids)
    n_val = max(1, int(round(len(ids) * val_fraction)))
    if len(ids) - n_val < 1:
        raise DataError(f"{len(ids)} tokens are too few to split into training and validation text.")
    return ids[:-n_val], ids[-n_val:]


def make_dataloader(
    ids,
    context_length: int,
    batch_size: int = 8,
    stride: int | None = None,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int | None = None,
) -> DataLoader:
    """Batches of ``(inputs, targets)``, each of shape ``(batch_size, context_length)``."""
    dataset = SlidingWindowDataset(ids, context_length, stride)
    batch_size = _check_positive_int(batch_size, "batch size")
    if drop_last and len(dataset) < batch_size:
        raise DataError(
            f"Only {len(dataset)} windows fit in this text, fewer than one batch of {batch_size}. "
            "Use more text, a smaller batch or a shorter context."
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=generator, num_workers=0)


def next_token_pairs(ids, start: int, context_length: int) -> list[tuple[list[int], int]]:
    """What one window teaches: for each prefix of the window, the token that follows.

    ``[40] -> 367``, ``[40, 367] -> 2885``, ... (as in the book's "and ---> established").
    """
    dataset = SlidingWindowDataset(ids, context_length, stride=1)
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < len(dataset):
        raise DataError(f"The window start must be between 0 and {len(dataset) - 1}, not {start!r}.")
    inputs, targets = dataset[start]
    inputs, targets = inputs.tolist(), targets.tolist()
    return [(inputs[: t + 1], targets[t]) for t in range(context_length)]


def epoch_batch(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The item indices of batch `step` when training passes (epochs) over `n` items.

    Batches follow each other without gaps: batch `step` holds positions `step * batch_size` up to
    the next batch's first, counted through the passes. Each pass visits every item once, in its
    own shuffled order `randperm(n)` seeded with `seed + pass`. The batch depends only on
    `(n, step, batch_size, seed)`, so a resumed run draws exactly the batches it would have drawn.
    """
    if n < 1 or batch_size < 1:
        raise DataError(f"Cannot draw batches of {batch_size} from {n} items.")
    first, last = step * batch_size, (step + 1) * batch_size - 1
    orders = {p: torch.randperm(n, generator=torch.Generator().manual_seed(seed + p)).tolist()
              for p in range(first // n, last // n + 1)}
    return [orders[position // n][position % n] for position in range(first, last + 1)]
