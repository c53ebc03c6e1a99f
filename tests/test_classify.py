"""Stage 5: spam/ham data, padding, the classification head, freezing, training and results."""

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

from core.gpt.errors import GlassBoxError
from core.lab.errors import DataError
from core.gpt import classify as C
from core.stages import classify as S

SHARED_DATA = Path((os.environ.get("GLASSBOX_DATA_DIR") or "").split(os.pathsep)[0]
                   or Path(__file__).resolve().parent.parent.parent / "shared" / "data")

# ------------------------------------------------------------------------------------- data


def test_sms_file_has_all_messages_by_plain_line_split():
    examples = S.load_sms_examples("sms-spam")
    assert len(examples) == 5574
    assert C.class_counts(examples) == {"ham": 4827, "spam": 747}


def test_balancing_and_split_sizes():
    examples = S.load_sms_examples("sms-spam")
    balanced = C.balance_classes(examples)
    assert C.class_counts(balanced) == {"ham": 747, "spam": 747}
    parts = C.split_examples(balanced)
    assert {k: len(v) for k, v in parts.items()} == {"train": 1045, "val": 149, "test": 300}
    # Every balanced message lands in exactly one split.
    texts = [e.text for part in parts.values() for e in part]
    assert sorted(texts) == sorted(e.text for e in balanced)
    # A fixed seed: the same split every time.
    again = C.split_examples(C.balance_classes(S.load_sms_examples("sms-spam")))
    assert [e.text for e in again["test"]] == [e.text for e in parts["test"]]


def test_balance_keeps_smaller_class_whole():
    ex = [C.Example(f"h{i}", 0) for i in range(10)] + [C.Example(f"s{i}", 1) for i in range(3)]
    balanced = C.balance_classes(ex, seed=1)
    assert C.class_counts(balanced) == {"ham": 3, "spam": 3}
    assert {e.text for e in balanced if e.label == 1} == {"s0", "s1", "s2"}


@pytest.mark.parametrize("text, fragment", [
    ("ham\thello\nspam no tab here\n", "line 2"),
    ("ham\thello\nmaybe\tsomething\n", "unknown label 'maybe'"),
    ("ham\thello\nham\tagain\n", "no 'spam' messages"),
    ("", "empty"),
    ("\n\n", "no messages"),
])
def test_malformed_sms_file_names_the_problem(tmp_path, text, fragment):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=fragment):
        S.load_sms_examples(f"file:{path}")


def test_wrong_kind_of_data_source_is_refused():
    with pytest.raises(DataError, match="not a labelled SMS"):
        S.load_sms_examples("tinyshakespeare")


def test_pad_or_truncate_and_last_token_index():
    assert C.pad_or_truncate([5, 6, 7], 5, pad_id=0) == ([5, 6, 7, 0, 0], 2)
    assert C.pad_or_truncate([5, 6, 7, 8, 9, 10], 4, pad_id=99) == ([5, 6, 7, 8], 3)
    assert C.pad_or_truncate([], 3, pad_id=9) == ([9, 9, 9], 0)
    with pytest.raises(GlassBoxError):
        C.pad_or_truncate([1], 0, pad_id=0)


class CharTokenizer:
    """A minimal tokenizer for tests: one id per character (a-z, space), no end-of-text token."""

    kind = "char"
    eot_id = None
    vocab_size = 28

    def encode(self, text):
        return [1 + min(ord(c.lower()) - 97, 26) if c.isalpha() else 27 for c in text]

    def decode(self, ids):
        return "".join(chr(96 + i) for i in ids)


def test_encode_examples_pads_with_zero_without_eot_and_counts_truncation():
    ex = [C.Example("abc", 0), C.Example("abcdefgh", 1)]
    split = C.encode_examples(ex, CharTokenizer(), length=5)
    assert split.ids.shape == (2, 5)
    assert split.ids[0].tolist() == [1, 2, 3, 0, 0]
    assert split.last_index.tolist() == [2, 4]
    assert split.labels.tolist() == [0, 1]
    assert split.truncated == 1


def test_pad_length_is_longest_training_message_capped_at_context():
    ex = [C.Example("a" * 7, 0), C.Example("a" * 3, 1)]
    assert C.choose_pad_length(ex, CharTokenizer(), context_length=16) == 7
    assert C.choose_pad_length(ex, CharTokenizer(), context_length=4) == 4
    assert C.choose_pad_length(ex, CharTokenizer(), context_length=16, requested=5) == 5
    with pytest.raises(GlassBoxError, match="longer than the model's context"):
        C.choose_pad_length(ex, CharTokenizer(), context_length=4, requested=5)


def test_confusion_matrix_counts_true_by_predicted():
    labels = torch.tensor([0, 0, 1, 1, 1])
    preds = torch.tensor([0, 1, 1, 1, 0])
    assert C.confusion_matrix(labels, preds) == [[1, 1], [1, 2]]


# ------------------------------------------------------------------------------------- model

import shutil  # noqa: E402

from core.lab import runs  # noqa: E402
from core.gpt.model import GPT, GPTConfig  # noqa: E402
from core.lab.models import save_model_run  # noqa: E402
from core.gpt.tokenizers import train_char  # noqa: E402


@contextlib.contextmanager
def as_command_line():
    """As inside `python -m core`: runs created outside a job record their own end."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs, "_command_line", getattr(runs, "_command_line", False))
        runs.started_from_command_line()
        yield


def fine_tune(run_id, start=None, train_config=None, progress=None, **settings):
    """Stage 5 as `python -m core classify` runs it: the stage, then the run's end recorded."""
    with as_command_line():
        try:
            result = S.run(S.Settings(start=start, run_id=run_id, **settings), progress=progress,
                           train_config=train_config)
        except BaseException as e:
            runs.finish_runs_started_here(error=str(e))
            raise
        runs.finish_runs_started_here(stopped=bool(result.get("stopped")))
    return result

TINY = dict(context_length=48, n_embd=32, n_head=2, n_layer=2)


def tiny_model(vocab_size=40, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, **TINY))


def test_freeze_modes_leave_the_right_parameters_trainable():
    def trainable(freeze):
        model = C.make_classifier(tiny_model(), freeze)
        return {name for name, p in model.named_parameters() if p.requires_grad}, model

    head, model = trainable("head")
    assert head == {"lm_head.weight", "lm_head.bias"}
    assert model.lm_head.weight.shape == (2, 32)
    assert model.lm_head.weight is not model.wte.weight  # the new head is not tied to the embedding

    last, _ = trainable("last-block")
    assert last == head | {n for n in last if n.startswith("blocks.1.")} | {"ln_f.weight", "ln_f.bias"}
    assert any(n.startswith("blocks.1.attn") for n in last)
    assert not any(n.startswith("blocks.0.") or n.startswith("wte") or n.startswith("wpe") for n in last)

    everything, model = trainable("all")
    assert everything == {name for name, _ in model.named_parameters()}
    assert C.trainable_parameters(model)[0] == C.trainable_parameters(model)[1]

    with pytest.raises(GlassBoxError, match="Unknown freeze mode"):
        C.make_classifier(tiny_model(), "middle")


def test_prediction_reads_the_last_real_token_only():
    model = C.make_classifier(tiny_model(), "all").eval()
    ids = torch.tensor([[5, 6, 7, 1, 1, 1], [8, 9, 10, 11, 12, 13]])
    last = torch.tensor([2, 5])
    logits = C.classify_logits(model, ids, last)
    assert logits.shape == (2, 2)
    # Different padding after the last real token: same answer (the model is causal).
    repadded = ids.clone()
    repadded[0, 3:] = torch.tensor([30, 31, 32])
    assert torch.allclose(C.classify_logits(model, repadded, last), logits, atol=1e-6)
    # The same message alone, with no padding at all: same answer too.
    alone = C.classify_logits(model, ids[:1, :3], torch.tensor([2]))
    assert torch.allclose(alone, logits[:1], atol=1e-5)
    # A real token changed: a different answer.
    changed = ids.clone()
    changed[0, 1] = 20
    assert not torch.allclose(C.classify_logits(model, changed, last)[0], logits[0])


def small_sms_data(tokenizer, length=24):
    ex = C.balance_classes(S.load_sms_examples("sms-spam"))
    parts = C.split_examples(ex)
    splits = {k: C.encode_examples(v, tokenizer, length) for k, v in parts.items()}
    return C.SmsData(splits, length, C.pad_id_for(tokenizer))


def test_task_batches_are_deterministic_packed_and_trimmed():
    tokenizer = train_char(S.load_sms_examples.__doc__ + "abcdefghijklmnopqrstuvwxyz0123456789")
    task = C.ClassificationTask(small_sms_data(tokenizer))
    x1, y1 = task.get_batch("train", 7, 8, torch.Generator().manual_seed(1))
    x2, y2 = task.get_batch("train", 7, 8, torch.Generator().manual_seed(99))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # depends on the step only
    ids, last = task.unpack(x1)
    assert ids.shape[0] == 8 and ids.shape[1] == int(last.max()) + 1 <= 24
    assert task.tokens_in_batch(x1) == int((last + 1).sum())
    # One pass over the 1,045 training messages (65 batches of 16) visits each message once.
    seen = torch.cat([task.batch_rows("train", s, 16) for s in range(1045 // 16)])
    assert len(set(seen.tolist())) == len(seen) == 1040


# --------------------------------------------------------------------------- runs (shared set-up)


def make_start_run(run_id="start"):
    tokenizer = train_char("".join(e.text for e in S.load_sms_examples("sms-spam")))
    model = tiny_model(tokenizer.vocab_size, seed=1)
    runs.create_run(run_id, "pretrain", {"data": "sms-spam"})
    save_model_run(run_id, model, tokenizer)
    return run_id


FAST = dict(batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=10, checkpoint_every=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A start run and a classifier fine-tuned from it for 30 steps, built once for this file."""
    root = tmp_path_factory.mktemp("classify-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLASSBOX_CHECKPOINTS_DIR", str(root))
        mp.setenv("GLASSBOX_DATA_DIR", os.environ.get("GLASSBOX_DATA_DIR") or str(SHARED_DATA))
        make_start_run()
        headline = fine_tune("spam", "start", freeze="all",
                               train_config=C.default_train_config(max_steps=30, **FAST))
    return root, headline


@pytest.fixture
def with_runs(trained, isolated_workspace):
    root, headline = trained
    for run in root.iterdir():
        shutil.copytree(run, isolated_workspace["checkpoints"] / run.name)
    return headline


def test_fine_tune_loss_falls_and_results_are_written(with_runs):
    headline = with_runs
    assert set(headline) >= {"run_id", "train_accuracy", "val_accuracy", "test_accuracy",
                             "train_loss", "val_loss", "test_loss", "seconds"}
    run = runs.open_run("spam")
    assert run.stage == "classify" and run.parent == "start"
    assert run.config["classifier"]["freeze"] == "all" and run.config["classifier"]["pad_length"] == 48
    assert run.config["classifier"]["counts"]["split"] == {"train": 1045, "val": 149, "test": 300}
    assert run.state == "finished"
    evals = [m for m in run.metrics() if "val_loss" in m]
    assert [m["step"] for m in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert {"val_accuracy", "train_accuracy"} <= set(evals[-1])
    results = json.loads((run.path / "results.json").read_text())
    assert results["test_accuracy"] == headline["test_accuracy"] > 0.6  # well above chance (0.5)
    matrix = results["confusion_matrix"]
    assert sum(map(sum, matrix)) == 300
    assert results["misclassified_count"] == matrix[0][1] + matrix[1][0] == len(results["misclassified"])
    assert abs((matrix[0][0] + matrix[1][1]) / 300 - results["test_accuracy"]) < 1e-4
    for row in results["misclassified"]:
        assert row["label"] != row["predicted"] and isinstance(row["text"], str)


def test_saved_classifier_loads_and_reproduces_test_accuracy(with_runs):
    model, tokenizer, config = S.load_classifier_run("spam")
    assert model.lm_head.out_features == 2
    data = S.prepare_sms_data(tokenizer, 48, max_length=config["classifier"]["pad_length"])
    result = C.evaluate_split(model, data.splits["test"])
    assert abs(result["accuracy"] - with_runs["test_accuracy"]) < 1e-4


def test_classify_text_gives_probabilities_that_sum_to_one(with_runs):
    probs = S.classify_text("spam", "WINNER!! Call 09061701461 now to claim your £900 prize")
    assert set(probs) == {"ham", "spam"}
    assert abs(sum(probs.values()) - 1) < 1e-5 and all(0 <= p <= 1 for p in probs.values())
    long = S.classify_message("spam", "see you at the station later " * 10)
    assert long["truncated"] and long["used_tokens"] == 48 and long["tokens"] == 290
    assert abs(sum(long["probabilities"].values()) - 1) < 1e-5
    with pytest.raises(DataError, match="Type a message"):
        S.classify_text("spam", "   ")
    with pytest.raises(GlassBoxError, match="not a classifier"):
        S.classify_text("start", "hello")


def test_wrong_start_runs_are_refused_clearly(with_runs):
    with pytest.raises(GlassBoxError, match="'classify' run"):
        fine_tune("again", "spam", train_config=C.default_train_config(max_steps=1))
    with pytest.raises(GlassBoxError, match="no run 'missing'"):
        fine_tune("again", "missing", train_config=C.default_train_config(max_steps=1))
    with pytest.raises(GlassBoxError, match="already exists"):
        fine_tune("spam", "start", train_config=C.default_train_config(max_steps=1))
    with pytest.raises(GlassBoxError, match="longer than the model's context"):
        fine_tune("again", "start", max_length=500, train_config=C.default_train_config(max_steps=1))
    assert not runs.run_dir("again").exists()  # nothing half-made is left behind


def test_random_start_keeps_shape_and_tokenizer_but_not_weights(with_runs):
    pre, tok_pre = S.load_start_model("start")
    rnd, tok_rnd = S.load_start_model(*S.parse_start("random:start"))
    assert tok_pre.to_dict() == tok_rnd.to_dict()
    assert pre.config == rnd.config
    assert not torch.equal(pre.wte.weight, rnd.wte.weight)


def test_stop_and_resume_matches_a_straight_run(with_runs):
    config = dict(max_steps=8, **{**FAST, "eval_every": 4, "checkpoint_every": 4})
    straight = fine_tune("straight", "start", freeze="last-block", max_length=16,
                           train_config=C.default_train_config(**config))

    def stop_at_4(record):
        if record.get("step") == 4:
            runs.request_stop("paused")

    first = fine_tune("paused", "start", freeze="last-block", max_length=16, progress=stop_at_4,
                        train_config=C.default_train_config(**config))
    assert first["stopped"] and first["steps"] == 4
    assert runs.read_status("paused")["state"] == "stopped"
    resumed = fine_tune("paused", resume=True, train_config=C.default_train_config(**config))
    assert resumed["steps"] == 8 and not resumed["stopped"]
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], abs=1e-4)


def test_cli_prints_the_contract_keys(with_runs, capsys):
    from core.__main__ import main

    code = main(["classify", "--from", "random:start", "--steps", "3", "--freeze", "head",
                 "--run-id", "cli-run", "--max-length", "16"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["run_id"] == "cli-run"
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert 0 <= last[key] <= 1
    assert {"train_loss", "val_loss", "test_loss", "seconds"} <= set(last)
    assert runs.open_run("cli-run").config["classifier"]["random_init"] is True
    code = main(["classify", "--from", "start", "--steps", "3", "--run-id", "x", "--freeze", "most"])
    assert code == 2
    code = main(["classify", "--steps", "3", "--run-id", "y"])
    assert code == 2 and "--from" in capsys.readouterr().err


def test_an_imported_gpt2_style_run_works_unchanged(isolated_workspace):
    """GPT-2's tokeniser (50,257 ids, end-of-text 50256 pads) and an 'import' run as the start."""
    from core.lab.tokenizer_files import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, context_length=64, n_embd=16, n_head=2, n_layer=1,
                          qkv_bias=True))
    runs.create_run("gpt2-like", "import", {"source": "test"})
    save_model_run("gpt2-like", model, tokenizer)
    headline = fine_tune("gpt2-spam", "gpt2-like", freeze="head",
                           train_config=C.default_train_config(max_steps=2, **FAST))
    info = runs.open_run("gpt2-spam").config["classifier"]
    assert info["pad_id"] == 50256 and info["pad_length"] <= 64
    assert 0 <= headline["test_accuracy"] <= 1
    assert abs(sum(S.classify_text("gpt2-spam", "Free tickets! Reply WIN").values()) - 1) < 1e-5


def test_cli_choices_match_the_core_module():
    from core.stages import classify as cmd

    assert cmd.FREEZE_MODES == tuple(C.FREEZE_MODES)
    assert (cmd.DEFAULT_FREEZE, cmd.DEFAULT_STEPS) == (C.DEFAULT_FREEZE, C.DEFAULT_STEPS)


# --------------------------------------------------------------------- best weights, early stopping


def test_keep_best_remembers_the_best_weights_and_stops_after_patience():
    model = C.make_classifier(tiny_model(), "head")
    keep = C.KeepBest(patience=2)
    weights = {}
    for step, val_loss in [(10, 0.9), (20, 0.5), (30, 0.6), (40, 0.7)]:
        with torch.no_grad():
            model.lm_head.weight.fill_(step)  # a different head at every evaluation
        weights[step] = model.lm_head.weight.clone()
        keep.update(model, step, val_loss)
        assert keep.should_stop() == (step == 40)
    assert (keep.best_step, keep.best_loss, keep.since_best) == (20, 0.5, 2)
    assert set(keep.weights) == {"lm_head.weight", "lm_head.bias"}  # only what learns is copied
    keep.restore(model)
    assert torch.equal(model.lm_head.weight, weights[20])
    assert not keep.update(model, 20, 0.1)  # a resumed run repeating step 20 changes nothing
    assert C.KeepBest(patience=None).should_stop() is False


def test_a_run_keeps_its_best_validation_weights_and_stops_early(with_runs, monkeypatch):
    """Validation losses crafted to turn at step 20: with patience 2 the run ends at step 40 and
    keeps (and is tested with) the weights of step 20."""
    crafted = iter([0.5, 0.3, 0.4, 0.45, 0.5, 0.6])
    monkeypatch.setattr(C.ClassificationTask, "evaluate",
                        lambda self, model: {"val_loss": next(crafted), "val_accuracy": 0.5, "train_accuracy": 0.5})
    config = C.default_train_config(max_steps=60, **{**FAST, "eval_every": 10, "checkpoint_every": 100})
    headline = fine_tune("early", "start", freeze="last-block", max_length=16, patience=2, train_config=config)
    assert headline["steps"] == 40 and headline["weights_step"] == 20 and not headline["stopped"]
    run = runs.open_run("early")
    assert [m["step"] for m in run.metrics() if "val_loss" in m] == [10, 20, 30, 40]
    results = S.results("early")
    assert results["early_stopped"] and results["best_val_loss"] == 0.3
    best = runs.load_tensors(run.path / S.BEST_FILE)
    saved = runs.load_tensors(run.path / "model.safetensors")
    assert best and all(torch.equal(saved[name], tensor) for name, tensor in best.items())
    model, tokenizer, config_ = S.load_classifier_run("early")
    data = S.prepare_sms_data(tokenizer, 48, max_length=16)
    assert abs(C.evaluate_split(model, data.splits["test"])["accuracy"] - results["test_accuracy"]) < 1e-4


def test_the_one_epoch_shuffle_visits_every_item_once_per_pass():
    from core.gpt.dataset import epoch_batch

    n, batch = 10, 4
    positions = [i for step in range(5) for i in epoch_batch(n, step, batch, seed=3)]  # 2 passes
    assert sorted(positions) == sorted(list(range(n)) * 2)
    assert epoch_batch(n, 2, batch, 3) == epoch_batch(n, 2, batch, 3)  # a function of the step
    assert positions[:n] != list(range(n))  # shuffled
    with pytest.raises(GlassBoxError):
        epoch_batch(0, 0, 4, 3)


# --------------------------------------------------------------------------------------- LoRA


def test_a_lora_classifier_saves_only_its_adapter_and_loads_on_its_parent(with_runs):
    headline = fine_tune("spam-lora", "start", lora_rank=2, lora_alpha=4.0, max_length=16,
                         train_config=C.default_train_config(max_steps=6, **FAST))
    run = runs.open_run("spam-lora")
    info = run.config["classifier"]
    assert info["freeze"] == "lora" and info["lora"]["rank"] == 2 and info["lora"]["alpha"] == 4.0
    assert not (run.path / "model.safetensors").exists()
    adapter = runs.load_tensors(run.path / S.ADAPTER_FILE)
    assert set(adapter) == {n for n in adapter if n.endswith(("lora_A", "lora_B")) or n.startswith("lm_head.")}
    assert any(n.endswith("attn.qkv.lora_A") for n in adapter) and any(n.endswith("mlp.fc.lora_B") for n in adapter)
    assert sum(t.numel() for t in adapter.values()) == info["trainable_parameters"] < info["parameters"] / 4
    model, tokenizer, _ = S.load_classifier_run("spam-lora")
    data = S.prepare_sms_data(tokenizer, 48, max_length=16)
    assert abs(C.evaluate_split(model, data.splits["test"])["accuracy"] - headline["test_accuracy"]) < 1e-4
    runs.delete_run("start")
    S._LOADED.clear()
    with pytest.raises(GlassBoxError, match="adapter on run 'start'"):
        S.classify_text("spam-lora", "Free prize, call now")


def test_lora_stop_and_resume_matches_a_straight_run(with_runs):
    config = dict(max_steps=8, **{**FAST, "eval_every": 4, "checkpoint_every": 4})
    lora_opts = dict(lora_rank=2, max_length=16)
    straight = fine_tune("lora-straight", "start", train_config=C.default_train_config(**config), **lora_opts)

    def stop_at_4(record):
        if record.get("step") == 4:
            runs.request_stop("lora-paused")

    first = fine_tune("lora-paused", "start", progress=stop_at_4, train_config=C.default_train_config(**config),
                      **lora_opts)
    assert first["stopped"] and first["steps"] == 4
    resumed = fine_tune("lora-paused", resume=True, train_config=C.default_train_config(**config))
    assert resumed["steps"] == 8 and not resumed["stopped"]
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], abs=1e-4)


@pytest.mark.parametrize("settings, message", [
    (dict(lora_rank=0), "rank must be a whole number of at least 1"),
    (dict(lora_rank=64), "Rank 64 is larger than the matrix"),
    (dict(lora_rank=2, lora_alpha=float("nan")), "alpha must be a positive number"),
    (dict(lora_rank=2, lora_targets=("qkv", "ffn")), "targets must be some of"),
])
def test_bad_lora_settings_are_refused_before_a_run_is_made(with_runs, settings, message):
    with pytest.raises(GlassBoxError, match=message):
        fine_tune("bad-lora", "start", train_config=C.default_train_config(max_steps=1), **settings)
    assert not runs.run_dir("bad-lora").exists()


def test_lora_on_a_run_without_the_named_matrices_names_them(with_runs, monkeypatch):
    from core.gpt import lora

    monkeypatch.setitem(lora.TARGETS, "mlp", ("gate_proj", "up_proj"))  # as a model without them
    with pytest.raises(GlassBoxError, match="no mlp matrices"):
        fine_tune("bad-lora", "start", lora_rank=2, train_config=C.default_train_config(max_steps=1))
    assert not runs.run_dir("bad-lora").exists()


def test_cli_lora_flags(with_runs, capsys):
    from core.__main__ import main

    assert main(["classify", "--from", "start", "--steps", "2", "--lora-rank", "2", "--lora-targets", "qkv",
                 "--max-length", "16", "--run-id", "cli-lora"]) == 0
    info = runs.open_run("cli-lora").config["classifier"]["lora"]
    assert info["targets"] == ["qkv"] and info["alpha"] == 2.0  # alpha defaults to the rank
    assert main(["classify", "--from", "start", "--lora-rank", "2", "--lora-alpha", "nan", "--run-id", "z"]) == 2
    assert "alpha" in capsys.readouterr().err


def test_choice_costs_side_by_side_before_training(with_runs):
    rows = {r["what learns"]: r for r in S.choice_costs("start", rank=2, time_steps=1, batch_size=4)}
    assert list(rows) == ["head", "last-block", "all", "lora"]
    total = C.trainable_parameters(C.build_classifier(runs.open_run("start").config["model"], "all"))[1]
    assert rows["head"]["trainable parameters"] == 32 * 2 + 2
    assert rows["head"]["trainable parameters"] < rows["lora"]["trainable parameters"] < rows["all"]["trainable parameters"]
    assert rows["all"]["share"] == 1.0 and rows["all"]["trainable parameters"] == total
    for row in rows.values():  # AdamW keeps two moments per trainable number, fp32
        assert row["AdamW moments (MB)"] == pytest.approx(8 * row["trainable parameters"] / 1e6, abs=0.01)
        assert row["step time (ms)"] > 0


def test_a_classifier_keeps_snapshots_and_the_slider_reads_its_verdict_token_by_token(with_runs):
    """Issue 19 on page 5: snapshots at 0, 10, 30 within the budget; the views of a snapshot are the
    classifier's (its verdict on the probe after each token), and the final weights' verdict is the
    one the message box gives (a different loader)."""
    from core.lab import snapshots

    run = runs.open_run("spam")
    assert [s.step for s in snapshots.list_snapshots(run.path)] == [0, 10, 30]
    info = run.config["snapshots"]
    assert info["probe"] == snapshots.CLASSIFIER_PROBE and info["budget_bytes"] == 64 * 2**20
    assert sum(s.bytes for s in snapshots.list_snapshots(run.path)) <= info["budget_bytes"]
    start, final = snapshots.views("spam", 0), snapshots.views("spam", None)
    for v in (start, final):
        assert v["kind"] == "classifier" and v["classes"] == ["ham", "spam"]
        assert len(v["by_position"]) == len(v["tokens"]) == len(v["attention"][0][0])
        assert abs(sum(v["probabilities"].values()) - 1) < 1e-5
        assert v["by_position"][-1] == pytest.approx(v["probabilities"]["spam"])
    expected = S.classify_message("spam", snapshots.CLASSIFIER_PROBE)
    assert final["probabilities"]["spam"] == pytest.approx(expected["probabilities"]["spam"], abs=1e-5)
    assert final["label"] == expected["label"]
    assert start["by_position"] != final["by_position"]  # training moved the verdicts
    assert len(start["map"]) == run.config["model"]["vocab_size"]


def test_a_lora_classifier_says_it_keeps_no_snapshots(with_runs):
    from core.lab import snapshots

    fine_tune("spam-lora-h", "start", lora_rank=2, max_length=16,
              train_config=C.default_train_config(max_steps=3, **FAST))
    history = snapshots.run_history("spam-lora-h")
    assert history["steps"] == [] and history["budget_bytes"] == 0
    assert "keeps no training snapshots" in history["note"]
