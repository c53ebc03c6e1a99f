"""Stage 4's task and command: batches, validation windows, encoding cache, the CLI, jobs, SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.lab import jobs, runs
from core.gpt.errors import TrainingError
from core.gpt.pretrain import LanguageModelTask, default_tokenizer, encode_corpus, recipe
from core.stages import pretrain as stage
from core.gpt.tokenizers import train_char
from core.gpt.train import TrainConfig, batch_generator

REPO = Path(__file__).resolve().parent.parent
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("GLASSBOX_THREADS", "1")  # small models on a shared machine


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "hamlet.txt"
    path.write_text(TEXT)
    return f"file:{path}"


def cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "core", "pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


TINY = ["--preset", "tiny", "--context-length", "32", "--batch-size", "8", "--eval-batches", "2",
        "--sample-tokens", "20", "--quiet"]


# ---------------------------------------------------------------------------- the task


def test_batches_are_windows_with_targets_shifted_by_one():
    ids = torch.arange(1000)
    task = LanguageModelTask(ids, context_length=16, val_fraction=0.1)
    x, y = task.get_batch("train", 5, 4, batch_generator(1, 5))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(y[:, :-1], x[:, 1:])  # the target is the next token
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert int(x.max()) < 900  # training windows never reach the held-out tail


def test_the_batch_of_a_step_depends_only_on_seed_and_step():
    task = LanguageModelTask(torch.arange(5000), context_length=8)
    a = task.get_batch("train", 42, 8, batch_generator(7, 42))[0]
    task.get_batch("train", 1, 8, batch_generator(7, 1))  # other draws in between change nothing
    b = task.get_batch("train", 42, 8, batch_generator(7, 42))[0]
    c = task.get_batch("train", 43, 8, batch_generator(7, 43))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_validation_windows_are_fixed_and_inside_the_held_out_text():
    task = LanguageModelTask(torch.arange(2000), context_length=10, val_fraction=0.25)
    task.prepare(TrainConfig(max_steps=1, batch_size=4, eval_batches=3), torch.device("cpu"))
    starts = task.validation_starts()
    assert len(starts) == 12 and torch.equal(starts, task.validation_starts())
    assert int(starts.max()) + 11 <= len(task.val_ids)


def test_validation_loss_of_an_untrained_model_is_near_ln_vocab():
    from core.gpt.model import GPT, GPTConfig

    tok = train_char(TEXT)
    ids = encode_corpus(tok, TEXT)
    task = LanguageModelTask(ids, context_length=16, tokenizer=tok)
    task.prepare(TrainConfig(max_steps=1, batch_size=8, eval_batches=2), torch.device("cpu"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=16, n_embd=16, n_head=2, n_layer=1))
    with torch.no_grad():
        val = task.evaluate(model)["val_loss"]
    assert abs(val - torch.log(torch.tensor(float(tok.vocab_size))).item()) < 0.3
    sample = task.sample(model)
    assert isinstance(sample, str) and sample.startswith("\n") and len(sample) > 50


def test_too_few_tokens_for_one_batch_is_refused():
    task = LanguageModelTask(torch.arange(300), context_length=16)
    with pytest.raises(TrainingError, match="fewer than one batch"):
        task.check(TrainConfig(max_steps=1, batch_size=64))


def test_encoded_corpus_is_cached_on_disk(tmp_path):
    stage._ENCODED.clear()
    tok = train_char(TEXT)
    first = stage.encode_cached(tok, TEXT, cache_dir=tmp_path)
    files = list(tmp_path.glob("encoded-*.safetensors"))
    assert len(files) == 1
    stage._ENCODED.clear()
    again = stage.encode_cached(tok, TEXT, cache_dir=tmp_path)
    assert torch.equal(first, again) and again.tolist() == tok.encode(TEXT)


def test_recipes_exist_for_the_presets_and_fall_back():
    assert recipe("small")["batch_size"] == 32
    assert "max_minutes" in recipe("base") or "max_steps" in recipe("base")
    assert recipe("unknown-preset")["max_minutes"] == 3.0
    # the modern block is base's shape: the same recipe and tokenizer, so the two compare fairly
    assert recipe("modern") == recipe("base") and default_tokenizer("modern") == default_tokenizer("base") == "bpe:1000"


# ---------------------------------------------------------------------------- the command line


def test_cli_trains_and_prints_json_last_line(corpus_file):
    done = cli("--data", corpus_file, "--tokenizer", "char", "--steps", "12", "--eval-every", "6",
               "--run-id", "cli1", *TINY)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("run_id", "steps", "tokens", "train_loss", "val_loss", "tokens_per_s", "seconds"):
        assert key in result
    assert result["run_id"] == "cli1" and result["steps"] == 12 and result["tokens"] == 12 * 8 * 32
    run = runs.open_run("cli1")
    assert run.stage == "pretrain" and run.config["model"]["context_length"] == 32
    assert run.config["train"]["max_steps"] == 12 and run.config["tokenizer"] == "char"
    assert (run.path / "tokenizer.json").is_file() and run.has_weights()
    from core.lab.models import load_model_run

    model, tokenizer, _ = load_model_run("cli1")  # stages 2, 3, 5 and 6 open it like this
    assert model.config.vocab_size == tokenizer.vocab_size


def test_cli_refuses_bad_settings_in_one_line(corpus_file):
    done = cli("--data", corpus_file, "--steps", "5", "--lr", "0", "--run-id", "bad1", *TINY)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and "learning rate" in done.stderr
    assert "Traceback" not in done.stderr
    from core.__main__ import run_command

    with pytest.raises(TrainingError, match="fewer than one batch"):
        run_command(["pretrain", "--data", corpus_file, "--steps", "5", "--run-id", "bad2", *TINY,
                     "--batch-size", "4096"])


def test_cli_resume_continues_a_stopped_run_exactly(corpus_file):
    from core.__main__ import run_command

    a = run_command(["pretrain", "--data", corpus_file, "--steps", "16", "--run-id", "s1",
                     "--checkpoint-every", "8", "--log-every", "4", *TINY])
    # a run cut short at step 8 (its budget said 8) would follow another schedule, so stop it
    # with a stop request instead: the job's Stop button does exactly this
    from core.__main__ import build_parser
    from core.lab import cli as cli_module
    from core.lab.training import RunHooks

    args = build_parser("pretrain").parse_args(
        ["--data", corpus_file, "--steps", "16", "--run-id", "s2", "--checkpoint-every", "8", "--log-every", "4", *TINY])
    real_log = RunHooks.log

    def log_and_stop(self, record):
        real_log(self, record)
        if record.get("step") == 8:
            runs.request_stop("s2")

    RunHooks.log = log_and_stop  # in-process, to drop the request mid-run
    try:
        first = stage.run(cli_module.settings_from_args(stage.Settings, args))
    finally:
        RunHooks.log = real_log
    assert first["stopped"] and first["steps"] == 8
    runs.clear_stop("s2")
    resumed = cli("--data", corpus_file, "--steps", "16", "--run-id", "s2", "--checkpoint-every", "8",
                  "--log-every", "4", "--resume", *TINY)
    assert resumed.returncode == 0, resumed.stderr
    b = json.loads(resumed.stdout.splitlines()[-1])
    assert b["steps"] == 16 and b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)


# ---------------------------------------------------------------------------- as a background job


def wait_for(predicate, timeout=90.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def checkpoint_step(run_id):
    path = runs.run_dir(run_id) / "train_state.json"
    try:
        return runs.read_json(path)["step"] if path.is_file() else 0
    except Exception:
        return 0


def test_job_killed_with_sigkill_resumes_from_its_last_checkpoint(corpus_file):
    argv = ["pretrain", "--data", corpus_file, "--steps", "4000", "--checkpoint-every", "5",
            "--eval-every", "1000", "--sample-every", "1000", "--log-every", "1", "--run-id", "kill", *TINY]
    jobs.start_job(argv, "kill")
    wait_for(lambda: checkpoint_step("kill") >= 10)
    state = jobs.job_state("kill")
    os.killpg(state.pid, signal.SIGKILL)  # no chance to save anything
    wait_for(lambda: jobs.job_state("kill").state == "failed")
    saved = checkpoint_step("kill")
    assert saved >= 10

    jobs.resume_job("kill")
    wait_for(lambda: checkpoint_step("kill") >= saved + 5)
    jobs.stop_job("kill")
    final = wait_for(lambda: (s := jobs.job_state("kill")).state in ("stopped", "failed") and s)
    assert final.state == "stopped", final.log_tail
    steps = [m["step"] for m in runs.read_jsonl(runs.run_dir("kill") / "metrics.jsonl") if "train_loss" in m]
    assert steps == list(range(1, len(steps) + 1))  # the rows after the checkpoint were replaced
    assert final.result["steps"] == steps[-1] > saved
