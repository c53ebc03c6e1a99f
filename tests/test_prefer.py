"""DPO (core/gpt/prefer.py) and the `prefer` stage: ln 2 at the start, a falling loss, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from core.gpt import lora
from core.gpt import prefer as dpo
from core.gpt.instruct import IGNORE_INDEX
from core.gpt.model import GPT, preset_config
from core.gpt.train import TrainConfig, make_optimizer


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models: one thread (on a shared 2-core machine a second thread made each step ~20x slower)."""
    monkeypatch.setenv("GLASSBOX_THREADS", "1")  # what the training loop configures
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ByteTokenizer:
    """Bytes 0-255 plus <|endoftext|> = 256."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def short_prompt(entry):
    return f"Q: {entry['instruction']}\nA: "


PAIRS = [
    {"instruction": "Greet me.", "chosen": "Hello, friend!", "rejected": "Go away."},
    {"instruction": "Thank me.", "chosen": "Thank you kindly.", "rejected": "Whatever."},
    {"instruction": "Help me.", "chosen": "Gladly, here.", "rejected": "No. Ugh."},
    {"instruction": "Say bye.", "chosen": "Goodbye, take care!", "rejected": "Finally gone."},
]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(preset_config("tiny", vocab_size=257))


def task_for(model, beta=0.5, reference="copy", pairs=PAIRS):
    ref = dpo.reference_copy(model) if reference == "copy" else None
    return dpo.DPOTask(ByteTokenizer(), {"train": pairs, "val": pairs}, context_length=64,
                       beta=beta, reference=ref, prompt_format=short_prompt, eval_batch_size=3)


# ---------------------------------------------------------------------------- data


def test_pairs_collate_to_answer_only_targets():
    tok = ByteTokenizer()
    pair = dpo.encode_pair(tok, PAIRS[0], short_prompt)
    assert pair.prompt_length == len(short_prompt(PAIRS[0]).encode())
    assert pair.chosen[-1] == pair.rejected[-1] == 256
    x, y = dpo.collate_pairs([pair, dpo.encode_pair(tok, PAIRS[1], short_prompt)], pad_id=256)
    assert x.shape == y.shape and x.shape[:2] == (2, 2)
    for row, answer in ((y[0, 0], "Hello, friend!"), (y[0, 1], "Go away.")):
        scored = [int(t) for t in row if t != IGNORE_INDEX]
        assert scored == list(answer.encode()) + [256]  # the answer and its end-of-text, nothing else
    assert torch.equal(x[0, 0, :pair.prompt_length], torch.tensor(pair.chosen[:pair.prompt_length]))


def test_sequence_logprob_is_the_sum_over_the_answer_tokens():
    model = tiny_model().eval()
    tok = ByteTokenizer()
    pair = dpo.encode_pair(tok, PAIRS[0], short_prompt)
    x, y = dpo.collate_pairs([pair], pad_id=256)
    with torch.no_grad():
        got = dpo.sequence_logprobs(model, x[:, 0], y[:, 0])
        ids = torch.tensor([pair.chosen])
        logp = torch.log_softmax(model(ids[:, :-1])[0][0], dim=-1)
        want = sum(float(logp[i, ids[0, i + 1]]) for i in range(pair.prompt_length - 1, len(pair.chosen) - 1))
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(want, abs=1e-4)


def test_records_missing_chosen_or_rejected_name_the_record():
    bad = [PAIRS[0], {"instruction": "x", "chosen": "y"}]
    with pytest.raises(dpo.PreferenceError, match="Record 1 .*no rejected"):
        dpo.parse_preference_records(json.dumps(bad))
    with pytest.raises(dpo.PreferenceError, match="Record 0 .*no chosen and no rejected"):
        dpo.parse_preference_records(json.dumps([{"instruction": "x", "output": "y"}]))
    with pytest.raises(dpo.PreferenceError, match="not valid JSON"):
        dpo.parse_preference_records("[{")


def test_identical_chosen_and_rejected_are_skipped_and_named_or_refused():
    same = {"instruction": "Hi", "chosen": "Same.", "rejected": "Same. "}
    kept, identical = dpo.parse_preference_records(json.dumps([PAIRS[0], same, PAIRS[1]]))
    assert [r["instruction"] for r in kept] == ["Greet me.", "Thank me."] and identical == [1]
    with pytest.raises(dpo.PreferenceError, match="identical.*nothing to learn"):
        dpo.parse_preference_records(json.dumps([same, same]))


def test_the_books_preference_file_has_six_identical_pairs(shared_data):
    text = (shared_data / "instruction-data-with-preference.json").read_text(encoding="utf-8")
    kept, identical = dpo.parse_preference_records(text)
    assert len(kept) + len(identical) == 1100
    assert len(identical) == 6


@pytest.mark.parametrize("beta", [0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_beta_must_be_positive(beta):
    with pytest.raises(dpo.PreferenceError, match="β must be a positive number"):
        dpo.check_beta(beta)
    with pytest.raises(dpo.PreferenceError):
        task_for(tiny_model(), beta=beta)


# ---------------------------------------------------------------------------- the loss


def test_a_policy_equal_to_its_reference_has_loss_ln2_and_zero_margin():
    model = tiny_model()
    task = task_for(model, beta=0.1)
    x, y = task.get_batch("train", 0, 4)
    with torch.no_grad():
        out, policy, ref = task.pair_loss(model, x, y)
    assert float(out["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert torch.allclose(out["margins"], torch.zeros(4), atol=1e-6)
    assert torch.allclose(policy, ref, atol=1e-6)
    stats = task.evaluate(model.eval())
    assert stats["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert stats["reward_margin"] == pytest.approx(0.0, abs=1e-6) and stats["reward_accuracy"] == 0.0
    assert stats["chosen_logp"] < 0 and stats["rejected_logp"] < 0


def test_dpo_loss_by_hand():
    out = dpo.dpo_loss(torch.tensor([-10.0]), torch.tensor([-20.0]), torch.tensor([-12.0]),
                       torch.tensor([-18.0]), beta=0.5)
    # rewards 0.5 * 2 = 1 and 0.5 * -2 = -1: margin 2, loss -log sigmoid(2)
    assert float(out["margins"][0]) == pytest.approx(2.0)
    assert float(out["loss"]) == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))))


def overfit(model, task, steps=40, lr=3e-3):
    opt = make_optimizer(model, TrainConfig(max_steps=steps, lr=lr, weight_decay=0.0), torch.device("cpu"))
    model.train()
    losses = []
    for step in range(steps):
        x, y = task.get_batch("train", step, 4)
        loss = task.loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_dpo_loss_falls_on_a_tiny_overfit_set_and_chosen_wins():
    model = tiny_model()
    task = task_for(model, beta=0.5)
    losses = overfit(model, task)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < 0.2
    stats = task.evaluate(model.eval())
    assert stats["reward_accuracy"] == 1.0 and stats["reward_margin"] > 2.0
    assert stats["chosen_reward"] > stats["rejected_reward"]


def test_lora_dpo_uses_the_adapters_off_as_reference_and_learns():
    model = tiny_model()
    lora.add_lora(model, rank=4, alpha=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    task = task_for(model, beta=0.5, reference=None)
    losses = overfit(model, task, steps=40, lr=1e-2)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < 0.4
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert task.evaluate(model.eval())["reward_accuracy"] == 1.0


def test_dpo_without_any_reference_is_refused():
    model = tiny_model()
    task = task_for(model, reference=None)
    x, y = task.get_batch("train", 0, 2)
    with pytest.raises(dpo.PreferenceError, match="reference"):
        task.loss(model, x, y)
