"""The training loop: loss falls, exact resume, stop, NaN, bad settings, crash-safe checkpoints."""

import errno
import json
import math

import pytest
import torch

from core.lab import runs
from core.gpt.errors import TrainingError
from core.gpt.model import GPT, GPTConfig
from core.gpt.pretrain import LanguageModelTask
from core.gpt.train import TrainConfig, budget_progress, learning_rate, make_optimizer
from core.lab import device as device_module
from core.lab.checkpoints import STAGING_DIR, load_checkpoint, recover_checkpoint
from core.lab.training import train
from core.stages.pretrain import lr_schedule, progress_summary
from pages._ui.charts import downsample

TEXT = "the cat sat on the mat. the dog sat on the log. " * 60
VOCAB = sorted(set(TEXT))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # Tiny models on a shared 2-core machine: one thread each avoids threads fighting for cores.
    monkeypatch.setenv("GLASSBOX_THREADS", "1")


def corpus_ids():
    return [VOCAB.index(c) for c in TEXT]


def tiny_model(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=len(VOCAB), context_length=16, n_embd=32, n_head=2, n_layer=2,
                         dropout=dropout))


def tiny_task():
    return LanguageModelTask(corpus_ids(), context_length=16, val_fraction=0.1)


def config(**kw):
    base = dict(max_steps=30, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_every=10,
                eval_batches=2, sample_every=1000, checkpoint_every=10, log_every=1, seed=7)
    base.update(kw)
    return TrainConfig(**base)


def new_run(run_id):
    runs.create_run(run_id, "pretrain", {})
    return run_id


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_falls_and_files_are_written():
    run_id = new_run("falls")
    result = train(run_id, tiny_model(), tiny_task(), config(max_steps=60, eval_every=20))
    metrics = runs.read_jsonl(runs.run_dir(run_id) / "metrics.jsonl")
    assert result["steps"] == 60 and result["stopped"] is False
    assert metrics[0]["train_loss"] > math.log(len(VOCAB)) - 0.3  # starts near ln(V): knows nothing
    assert result["train_loss"] < metrics[0]["train_loss"] - 1.0
    assert result["val_loss"] < 2.0
    assert [m["step"] for m in metrics] == list(range(1, 61))
    assert {"step", "tokens", "train_loss", "lr", "tokens_per_s", "elapsed_s"} <= set(metrics[0])
    assert [m["step"] for m in metrics if "val_loss" in m] == [20, 40, 60]
    assert result["tokens"] == 60 * 8 * 16
    path = runs.run_dir(run_id)
    for name in ("model.safetensors", "train_state.safetensors", "train_state.json"):
        assert (path / name).is_file()
    assert not (path / STAGING_DIR).exists()
    assert runs.read_json(path / "train_state.json")["step"] == 60
    # the saved weights load back into a fresh model and give the same validation loss
    from core.lab.models import load_model_weights

    fresh = tiny_model(seed=99)
    load_model_weights(fresh, runs.load_tensors(path / "model.safetensors"))
    fresh.eval()
    with torch.no_grad():
        task = tiny_task()
        task.prepare(config(), torch.device("cpu"))
        assert task.evaluate(fresh)["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)


def test_stopped_and_resumed_run_ends_exactly_like_a_straight_run():
    straight_model = tiny_model(dropout=0.1)
    straight = train(new_run("straight"), straight_model, tiny_task(), config())

    run_id = new_run("resumed")

    def stop_at_12(record):
        if record.get("step") == 12 and "train_loss" in record:
            runs.request_stop(run_id)

    first = train(run_id, tiny_model(dropout=0.1), tiny_task(), config(), progress=stop_at_12)
    assert first["stopped"] is True and first["steps"] == 12
    assert runs.read_json(runs.run_dir(run_id) / "train_state.json")["step"] == 12
    runs.clear_stop(run_id)

    other_init = tiny_model(dropout=0.1, seed=123)  # the checkpoint must overwrite everything
    torch.manual_seed(999)  # and the RNG state too
    second = train(run_id, other_init, tiny_task(), config(), resume=True)
    assert second["steps"] == 30 and second["stopped"] is False
    assert second["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-6)
    assert second["val_loss"] == pytest.approx(straight["val_loss"], abs=1e-6)
    a, b = weights(straight_model), weights(other_init)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    steps = [m["step"] for m in runs.read_jsonl(runs.run_dir(run_id) / "metrics.jsonl")]
    assert steps == list(range(1, 31))  # no gap, no repeat
    assert second["tokens"] == straight["tokens"]


def test_stop_request_saves_and_returns():
    run_id = new_run("stopme")
    runs.request_stop(run_id)
    result = train(run_id, tiny_model(), tiny_task(), config())
    assert result["stopped"] is True and result["steps"] == 0
    assert (runs.run_dir(run_id) / "train_state.json").is_file()


class NaNAfter(LanguageModelTask):
    """A task whose loss turns NaN from step `bad_step` on (as a diverging run would)."""

    bad_step = 14

    def loss(self, model, inputs, targets):
        loss = super().loss(model, inputs, targets)
        self.calls = getattr(self, "calls", 0) + 1
        return loss * float("nan") if self.calls >= self.bad_step else loss


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint():
    run_id = new_run("nan")
    task = NaNAfter(corpus_ids(), context_length=16)
    with pytest.raises(TrainingError, match=r"NaN.*step 14.*checkpoint \(step 10\) is kept"):
        train(run_id, tiny_model(), task, config())
    path = runs.run_dir(run_id)
    assert runs.read_json(path / "train_state.json")["step"] == 10
    saved = runs.load_tensors(path / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    resumed = train(run_id, tiny_model(), tiny_task(), config(max_steps=12), resume=True)
    assert resumed["steps"] == 12 and math.isfinite(resumed["train_loss"])


@pytest.mark.parametrize("bad, message", [
    (dict(lr=0.0), "learning rate must be above 0"),
    (dict(lr=-1e-3), "learning rate must be above 0"),
    (dict(lr=float("nan")), "must be a number"),
    (dict(lr=float("inf")), "must be a number"),
    (dict(min_lr=1.0), "minimum learning rate"),
    (dict(batch_size=0), "Batch size must be a whole number"),
    (dict(grad_accum=0), "Grad accum"),
    (dict(max_steps=None), "budget"),
    (dict(max_steps=-5), "budget of steps must be above 0"),
    (dict(max_minutes=float("nan"), max_steps=None), "budget of minutes"),
    (dict(batch_size=1000), "fewer than one batch"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(TrainingError, match=message):
        train(new_run("bad"), tiny_model(), tiny_task(), config(**bad))


def test_model_too_big_for_memory_is_refused(monkeypatch):
    monkeypatch.setattr(device_module, "available_memory_bytes", lambda device: 10_000)
    with pytest.raises(TrainingError, match="GiB to train"):
        train(new_run("big"), tiny_model(), tiny_task(), config())


def test_corpus_shorter_than_a_window_is_refused():
    with pytest.raises(TrainingError, match="fewer than one window"):
        LanguageModelTask(list(range(10)) * 2, context_length=16)


def test_schedule_warms_up_then_decays_to_min_lr():
    c = TrainConfig(max_steps=1000, lr=1e-3, min_lr=1e-4, warmup_steps=100)
    lrs = [learning_rate(c, s, budget_progress(c, s, 0, 0.0)) for s in range(1001)]
    assert lrs[0] < lrs[50] < lrs[99] <= 1e-3
    assert max(lrs) == pytest.approx(1e-3, rel=1e-2)
    assert lrs[1000] == pytest.approx(1e-4)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[100:], lrs[101:]))  # only decays after warm-up
    # a minutes budget: the cosine follows the clock
    m = TrainConfig(max_minutes=1.0, lr=1e-3, min_lr=1e-4, warmup_steps=0)
    assert learning_rate(m, 500, budget_progress(m, 500, 0, 30.0)) == pytest.approx(5.5e-4)
    assert learning_rate(m, 900, budget_progress(m, 900, 0, 60.0)) == pytest.approx(1e-4)
    points = lr_schedule(c, 1000)
    assert points[0][0] == 0 and points[-1] == (1000, pytest.approx(1e-4))


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig(max_steps=1, weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name


def test_gradient_accumulation_matches_one_big_batch():
    one = train(new_run("acc1"), tiny_model(), tiny_task(), config(max_steps=3, batch_size=8, grad_accum=2))
    big = train(new_run("acc2"), tiny_model(), tiny_task(), config(max_steps=3, batch_size=16, grad_accum=1))
    assert one["train_loss"] == pytest.approx(big["train_loss"], abs=1e-5)


def test_disk_full_keeps_the_previous_checkpoint(monkeypatch):
    run_id = new_run("full")
    real_save = runs.save_tensors
    calls = {"n": 0}

    def failing_save(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (2 files) succeeds, the next one fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(path, tensors, metadata)

    monkeypatch.setattr(runs, "save_tensors", failing_save)
    with pytest.raises(TrainingError, match=r"No space left.*checkpoint from step 10 is kept"):
        train(run_id, tiny_model(), tiny_task(), config())
    monkeypatch.setattr(runs, "save_tensors", real_save)
    path = runs.run_dir(run_id)
    assert runs.read_json(path / "train_state.json")["step"] == 10
    resumed = train(run_id, tiny_model(), tiny_task(), config(), resume=True)
    assert resumed["steps"] == 30


def test_crash_while_writing_a_checkpoint_keeps_the_old_one():
    run_id = new_run("crash")
    train(run_id, tiny_model(), tiny_task(), config(max_steps=10))
    path = runs.run_dir(run_id)
    # a later checkpoint was being written when the process died: only part of it is there
    staging = path / STAGING_DIR
    staging.mkdir()
    (staging / "train_state.safetensors").write_bytes(b"half a file")
    recover_checkpoint(path)
    assert not staging.exists()
    model = tiny_model()
    counters = load_checkpoint(path, model, make_optimizer(model, config(), torch.device("cpu")),
                               torch.device("cpu"))
    assert counters["step"] == 10


def test_crash_while_moving_a_checkpoint_finishes_the_move():
    run_id = new_run("moving")
    model = tiny_model()
    train(run_id, model, tiny_task(), config(max_steps=10, checkpoint_every=5))
    path = runs.run_dir(run_id)
    # make a complete step-10 checkpoint in the staging folder, and an old step-5 json in place
    staging = path / STAGING_DIR
    staging.mkdir()
    for name in ("model.safetensors", "train_state.json"):
        (staging / name).write_bytes((path / name).read_bytes())
    counters = runs.read_json(path / "train_state.json")
    runs.write_json_atomic(path / "train_state.json", {**counters, "step": 5})
    recover_checkpoint(path)  # moves were cut short after train_state.safetensors: finish them
    assert not staging.exists()
    assert runs.read_json(path / "train_state.json")["step"] == 10


def test_resume_after_kill_drops_metrics_past_the_checkpoint():
    run_id = new_run("killed")
    train(run_id, tiny_model(), tiny_task(), config(max_steps=10))
    path = runs.run_dir(run_id)
    with open(path / "metrics.jsonl", "a") as f:  # rows a killed process wrote after its checkpoint
        f.write(json.dumps({"step": 11, "train_loss": 9.9}) + "\n" + '{"step": 12, "trunc')
    train(run_id, tiny_model(), tiny_task(), config(max_steps=15), resume=True)
    steps = [m["step"] for m in runs.read_jsonl(path / "metrics.jsonl")]
    assert steps == list(range(1, 16))


def test_minutes_budget_ends_the_run():
    result = train(new_run("minutes"), tiny_model(), tiny_task(),
                   config(max_steps=None, max_minutes=0.02, eval_every=5))
    assert 0 < result["steps"] and result["seconds"] < 0.02 * 60 + 5
    assert result["val_loss"] is not None


def test_tokens_budget_ends_the_run():
    result = train(new_run("tokens"), tiny_model(), tiny_task(), config(max_steps=None, max_tokens=8 * 16 * 5))
    assert result["steps"] == 5 and result["tokens"] == 640


def test_evaluating_every_step_logs_each_step_once():
    run_id = new_run("every")
    train(run_id, tiny_model(), tiny_task(), config(max_steps=3, eval_every=1))
    metrics = runs.read_jsonl(runs.run_dir(run_id) / "metrics.jsonl")
    assert [m["step"] for m in metrics if "train_loss" in m] == [1, 2, 3]
    assert [m["step"] for m in metrics if "val_loss" in m] == [1, 2, 3]


def test_progress_summary_and_downsample_for_the_page():
    assert progress_summary([], {"max_steps": 10})["step"] == 0
    rows = [{"step": s, "tokens": s * 100, "train_loss": 3.0 - s / 100, "elapsed_s": s / 10, "tokens_per_s": 1000.0}
            for s in range(1, 101)]
    rows[49]["val_loss"] = 2.5
    summary = progress_summary(rows, {"max_steps": 200})
    assert summary["step"] == 100 and summary["val_loss"] == 2.5
    assert summary["fraction"] == pytest.approx(0.5) and summary["eta_s"] == pytest.approx(10.0)
    assert progress_summary(rows, {"max_minutes": 0.5})["eta_s"] == pytest.approx(20.0)
    thin = downsample(rows, 30)
    assert len(thin) <= 31 and thin[0] is rows[0] and thin[-1] is rows[-1]
    assert downsample(rows[:5], 30) == rows[:5]


def test_ctrl_c_saves_a_checkpoint_and_returns_stopped():
    class Interrupted(LanguageModelTask):
        def get_batch(self, split, step, batch_size, generator):
            if step == 5:
                raise KeyboardInterrupt
            return super().get_batch(split, step, batch_size, generator)

    run_id = new_run("ctrlc")
    result = train(run_id, tiny_model(), Interrupted(corpus_ids(), context_length=16), config())
    assert result["stopped"] is True and result["steps"] == 5
    assert runs.read_json(runs.run_dir(run_id) / "train_state.json")["step"] == 5
