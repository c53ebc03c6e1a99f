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
from core.lab import models


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


# ---------------------------------------------------------------------------- the stage


from core.lab import adapters, runs  # noqa: E402
from core.lab.errors import RunNotFoundError  # noqa: E402
from core.stages import prefer as stage  # noqa: E402

TOY = [{"instruction": f"Answer question {n}.", "input": "", "output": f"Answer {n}.",
        "chosen": f"Certainly, the answer is {n}. Thank you!", "rejected": f"Ugh, {n}, obviously."}
       for n in range(40)]


@pytest.fixture
def sft_run(tmp_path):
    """A tiny 'instruction-tuned' run (untrained weights, a small BPE) and a toy preference file."""
    from core.gpt.instruct import format_prompt
    from core.gpt.tokenizers import train_bpe
    from core.lab.models import save_model_run

    text = " ".join(format_prompt(r) + r["chosen"] + " " + r["rejected"] for r in TOY)
    tokenizer = train_bpe(text, 300)
    torch.manual_seed(0)
    model = GPT(preset_config("tiny", tokenizer.vocab_size, context_length=128))
    runs.create_run("sft", "instruct", {})
    save_model_run("sft", model, tokenizer)
    path = tmp_path / "toy-preferences.json"
    path.write_text(json.dumps(TOY))
    return f"file:{path}"


def dpo_settings(data, run_id="dpo", **kw):
    values = dict(start="sft", data=data, steps=12, eval_every=6, eval_pairs=4, batch_size=4,
                  answers=2, max_new_tokens=8, run_id=run_id)
    return stage.Settings(**{**values, **kw})


def test_the_command_prints_the_headline_and_writes_the_side_by_side(sft_run, capsys):
    from core.__main__ import main

    code = main(["prefer", "--from", "sft", "--data", sft_run, "--steps", "12", "--eval-every", "6",
                 "--eval-pairs", "4", "--batch-size", "4", "--answers", "2", "--max-new-tokens", "8",
                 "--beta", "0.5", "--run-id", "dpo-cli"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert {"run_id", "reward_accuracy_start", "reward_accuracy", "reward_margin", "val_loss", "seconds"} <= set(result)
    assert result["run_id"] == "dpo-cli" and result["steps"] == 12
    assert result["reward_accuracy_start"] == 0.0  # policy = reference: every margin is exactly 0
    assert result["val_loss_start"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["reward_margin"] > 0 and result["val_loss"] < math.log(2)
    assert "margin" in out.err and "accuracy" in out.err
    found = stage.results("dpo-cli")
    assert [m["step"] for m in found["evals"]] == [0, 6, 12]
    assert {"val_loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp"} <= set(found["latest"])
    rows = found["responses"]
    assert len(rows) == 2 and list(rows[0])[:5] == ["instruction", "input", "output", "sft_response", "dpo_response"]
    assert rows[0]["instruction"] == TOY[34]["instruction"]  # the first test record of the 85/10/5 split


def stop_at(run_id, step):
    def progress(record):
        if isinstance(record, dict) and record.get("step") == step and "train_loss" in record:
            runs.request_stop(run_id)
    return progress


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_resume_is_exact_for_full_and_lora_dpo(sft_run, lora_rank):
    straight = stage.run(dpo_settings(sft_run, "straight", lora_rank=lora_rank, answers=0), progress=None)
    first = stage.run(dpo_settings(sft_run, "resumed", lora_rank=lora_rank, answers=0),
                      progress=stop_at("resumed", 5))
    assert first["stopped"] is True and first["steps"] == 5
    runs.clear_stop("resumed")
    second = stage.run(dpo_settings(sft_run, "resumed", resume=True, start=None), progress=None)
    assert second["steps"] == straight["steps"] == 12 and second["stopped"] is False
    for key in ("val_loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp", "train_loss"):
        assert second[key] == pytest.approx(straight[key], abs=1e-5), key
    a, _, _ = adapters.load_run("straight")
    b, _, _ = adapters.load_run("resumed")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, atol=1e-6), name


def test_a_lora_dpo_run_saves_only_its_adapter_and_names_a_deleted_parent(sft_run):
    result = stage.run(dpo_settings(sft_run, "dpo-lora", lora_rank=2, lora_targets=("qkv",), answers=0),
                       progress=None)
    assert result["lora"] is True and result["trainable_parameters"] == 2 * 2 * (64 + 192)
    saved = runs.load_tensors(runs.run_dir("dpo-lora") / "model.safetensors")
    assert sorted(saved) == sorted(f"blocks.{i}.attn.qkv.lora_{m}" for i in (0, 1) for m in "AB")
    model, _, config = adapters.load_run("dpo-lora")
    assert config["lora"]["parent"] == "sft" and not any("lora" in n for n in model.state_dict())
    parent, _, _ = adapters.load_run("sft")
    assert (model.blocks[0].attn.qkv.weight - parent.blocks[0].attn.qkv.weight).abs().max() > 0
    # The one run loader opens it too (every page and command goes through it), as a language model.
    same, _, _ = models.load_model_run("dpo-lora")
    torch.testing.assert_close(same.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    assert "dpo-lora" in [r.id for r in models.language_model_runs()]
    runs.delete_run("sft")
    with pytest.raises(RunNotFoundError, match="LoRA adapter on top of run 'sft', which has been deleted"):
        adapters.load_run("dpo-lora")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(beta=0), dpo.PreferenceError, "β must be a positive number"),
    (dict(beta=-1.0), dpo.PreferenceError, "β must be a positive number"),
    (dict(lora_rank=0), lora.LoRAError, "at least 1"),
    (dict(lora_rank=4, lora_alpha=float("nan")), lora.LoRAError, "alpha"),
    (dict(start=None), Exception, "--from"),
    (dict(steps=0), Exception, "at least 1"),
])
def test_bad_settings_are_refused_before_anything_is_written(kwargs, error, message):
    with pytest.raises(error, match=message):
        dpo_settings("file:x.json", **kwargs)
    assert not runs.run_dir("dpo").exists()


def test_bad_preference_files_and_start_runs_are_named(sft_run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(TOY[:3] + [{"instruction": "x", "input": "", "chosen": "y"}]))
    with pytest.raises(dpo.PreferenceError, match="Record 3 .*no rejected"):
        stage.run(dpo_settings(f"file:{bad}"), progress=None)
    same = tmp_path / "same.json"
    same.write_text(json.dumps([{**r, "rejected": r["chosen"]} for r in TOY]))
    with pytest.raises(dpo.PreferenceError, match="identical"):
        stage.run(dpo_settings(f"file:{same}"), progress=None)
    runs.create_run("words", "tokenizer", {})
    with pytest.raises(Exception, match="'tokenizer' run; DPO starts from a model that already follows"):
        stage.run(dpo_settings(sft_run, start="words"), progress=None)
    assert not runs.run_dir("dpo").exists()


def test_the_books_preference_data_is_found_by_its_registry_name(shared_data):
    records, identical = stage.load_preferences(stage.DATA_SOURCE)
    assert len(records) == 1094 and len(identical) == 6
    assert stage.preference_file(stage.DATA_SOURCE).name == "instruction-data-with-preference.json"


def test_settings_round_trip_through_the_command_line():
    from core.__main__ import build_parser
    from core.lab import cli

    settings = stage.Settings(start="sft", steps=7, beta=0.25, lora_rank=4, lora_alpha=8.0,
                              lora_targets=("qkv", "mlp"), run_id="x")
    argv = cli.to_argv(settings)
    assert argv[argv.index("--lora-targets") + 1] == "qkv,mlp" and "--minutes" not in argv
    again = cli.settings_from_args(stage.Settings, build_parser("prefer").parse_args(argv))
    assert again == settings


def test_a_stage_6_lora_run_with_adapter_safetensors_opens_as_parent_plus_adapter(sft_run):
    model, _, _ = adapters.load_run("sft")
    lora.add_lora(model, rank=2, targets=("qkv",))
    torch.manual_seed(3)
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    runs.create_run("sft-lora", "instruct", {"lora": {"parent": "sft", "rank": 2, "alpha": 2.0,
                                                      "targets": ["qkv"], "matrices": 2}})
    runs.save_tensors(runs.run_dir("sft-lora") / "adapter.safetensors",
                      {k: v.detach().contiguous() for k, v in lora.lora_tensors(model).items()})
    assert "sft-lora" in stage.start_runs()
    merged, _, _ = adapters.load_run("sft-lora")
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(x)[0] - model.eval()(x)[0]).abs().max() <= 1e-5


def test_a_chatml_model_gets_its_own_template_and_end_of_turn(sft_run):
    from core.gpt.chat import chatml_prompt

    class ChatTokenizer(ByteTokenizer):
        specials = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
        vocab_size = 259

        def encode(self, text):
            return [self.specials[text]] if text in self.specials else super().encode(text)

        def special_ids(self):
            return set(self.specials.values())

    fmt, end = stage.prompt_format_for(ChatTokenizer())
    entry = {"instruction": "Greet me.", "input": "politely", "chosen": "Hi!", "rejected": "No."}
    assert end == 258
    assert fmt(entry) == chatml_prompt([{"role": "user", "content": "Greet me.\n\npolitely"}])
    assert fmt(entry).endswith("<|im_start|>assistant\n")
    pair = dpo.encode_pair(ChatTokenizer(), entry, fmt, end)
    assert pair.chosen[-1] == pair.rejected[-1] == 258
    _, tokenizer, _ = adapters.load_run("sft")  # our own BPE: the book's Alpaca template
    fmt, end = stage.prompt_format_for(tokenizer)
    assert fmt(entry).startswith("Below is an instruction") and end == tokenizer.eot_id
