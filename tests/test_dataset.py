"""Stage 1 sliding windows: inputs, targets shifted by one, splits, batches, and bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.gpt.dataset import SlidingWindowDataset, make_dataloader, next_token_pairs, split_ids
from core.lab.errors import DataError


def test_windows_without_overlap():
    data = SlidingWindowDataset(list(range(10)), context_length=4, stride=4)
    assert len(data) == 2
    x, y = data[0]
    assert x.tolist() == [0, 1, 2, 3] and y.tolist() == [1, 2, 3, 4]
    x, y = data[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8]
    assert x.dtype == torch.long and x.shape == (4,)


def test_overlapping_windows_and_default_stride():
    data = SlidingWindowDataset(torch.arange(10), context_length=4, stride=1)
    assert len(data) == 6
    assert data[-1][1].tolist() == [6, 7, 8, 9]  # the last target ends on the last id
    assert len(SlidingWindowDataset(range(10), 4)) == 2  # stride defaults to the context length
    with pytest.raises(IndexError):
        data[6]


def test_shortest_possible_corpus():
    data = SlidingWindowDataset([7, 8, 9], context_length=2)
    assert len(data) == 1 and data[0][0].tolist() == [7, 8] and data[0][1].tolist() == [8, 9]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 200), context=st.integers(1, 50), stride=st.integers(1, 60))
def test_every_target_is_its_input_shifted_by_one(n, context, stride):
    ids = torch.arange(100, 100 + n)
    if n < context + 1:
        with pytest.raises(DataError):
            SlidingWindowDataset(ids, context, stride)
        return
    data = SlidingWindowDataset(ids, context, stride)
    assert len(data) == (n - context - 1) // stride + 1
    for i in range(len(data)):
        x, y = data[i]
        assert x.shape == y.shape == (context,)
        assert x[0].item() == 100 + i * stride
        assert torch.equal(x[1:], y[:-1]) and y[-1].item() == x[-1].item() + 1


@pytest.mark.parametrize("ids, context, stride", [
    ([1, 2, 3], 3, 1),          # corpus shorter than the context + 1
    ([], 4, 4),                 # empty
    (list(range(10)), 0, 1),    # no context
    (list(range(10)), -2, 1),
    (list(range(10)), 4, 0),    # a stride that never moves
    (list(range(10)), 4.5, 1),
    (list(range(10)), "4", 1),
    ([0.5, 1.5, 2.5], 1, 1),    # not whole numbers
    (["a", "b", "c"], 1, 1),
    (torch.rand(10), 2, 1),
    (torch.zeros(2, 5, dtype=torch.long), 2, 1),
])
def test_bad_windows_raise_data_error(ids, context, stride):
    with pytest.raises(DataError):
        SlidingWindowDataset(ids, context, stride)


def test_short_corpus_message_is_clear():
    with pytest.raises(DataError, match="too short for a context of 64"):
        SlidingWindowDataset(list(range(10)), 64)


def test_split_ids():
    train, val = split_ids(list(range(100)), 0.1)
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))
    train, val = split_ids(torch.arange(5), 0.01)
    assert len(val) == 1 and len(train) == 4  # at least one validation token


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, float("nan"), "0.1", None, True])
def test_split_ids_bad_fraction(fraction):
    with pytest.raises(DataError):
        split_ids(list(range(100)), fraction)


def test_split_ids_too_few():
    with pytest.raises(DataError):
        split_ids([1], 0.5)


def test_dataloader_batches():
    loader = make_dataloader(list(range(1000)), context_length=8, batch_size=4, stride=8, shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (4, 8)
    assert inputs[0].tolist() == list(range(8)) and targets[0].tolist() == list(range(1, 9))
    assert len(loader) == len(SlidingWindowDataset(range(1000), 8, 8)) // 4  # drop_last


def test_dataloader_shuffle_is_reproducible_with_a_seed():
    def first_batch(seed):
        return next(iter(make_dataloader(list(range(1000)), 8, batch_size=4, seed=seed)))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_dataloader_too_small_for_a_batch():
    with pytest.raises(DataError, match="fewer than one batch"):
        make_dataloader(list(range(20)), context_length=8, batch_size=4)
    with pytest.raises(DataError):
        make_dataloader(list(range(100)), context_length=8, batch_size=0)


def test_next_token_pairs():
    pairs = next_token_pairs([40, 367, 2885, 1464, 1807], start=0, context_length=4)
    assert pairs == [([40], 367), ([40, 367], 2885), ([40, 367, 2885], 1464), ([40, 367, 2885, 1464], 1807)]
    assert next_token_pairs([1, 2, 3, 4], start=1, context_length=2) == [([2], 3), ([2, 3], 4)]
    with pytest.raises(DataError):
        next_token_pairs([1, 2, 3, 4], start=2, context_length=2)
    with pytest.raises(DataError):
        next_token_pairs([1, 2], start=0, context_length=4)


def test_pretraining_validates_on_sliding_windows_of_the_held_out_text():
    """Stage 4's validation loss is measured on stage 1's SlidingWindowDataset over the held-out ids."""
    import torch.nn.functional as F

    from core.gpt.model import GPT, GPTConfig
    from core.gpt.pretrain import LanguageModelTask
    from core.gpt.train import TrainConfig

    ids = torch.arange(3000) % 50
    task = LanguageModelTask(ids, context_length=12, val_fraction=0.2)
    task.prepare(TrainConfig(max_steps=1, batch_size=4, eval_batches=2), torch.device("cpu"))
    windows = task.validation_windows()
    assert isinstance(windows, SlidingWindowDataset)
    assert torch.equal(windows.ids, task.val_ids) and windows.context_length == 12
    starts = task.validation_starts()
    assert len(starts) == 8 and windows.stride > 12  # spread over the held-out text, not overlapping
    for i, s in enumerate(starts.tolist()):
        x, y = windows[i]
        assert torch.equal(x, task.val_ids[s:s + 12]) and torch.equal(y, task.val_ids[s + 1:s + 13])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=12, n_embd=16, n_head=2, n_layer=1)).eval()
    loader = make_dataloader(task.val_ids, 12, batch_size=8, stride=windows.stride, shuffle=False)
    x, y = next(iter(loader))  # the same 8 windows, through the DataLoader
    with torch.no_grad():
        expected = F.cross_entropy(model(x)[0].reshape(-1, 50), y.reshape(-1)).item()
        assert task.evaluate(model)["val_loss"] == pytest.approx(expected, rel=1e-5)
