"""Faults: a pulled plug, a restarted server, damaged files and a full disk lose nothing.

Each test does the fault for real: a background pre-training job (a child process, as the page
starts it) is SIGKILLed at a chosen moment — half-way through writing a metrics line, half-way
through writing a checkpoint, between the moves that put a checkpoint in place — or its
checkpoint write fails with "No space left on device". The moment is chosen by a tiny
`sitecustomize` that only this test puts on the child's PYTHONPATH (FAULT_HOOK below): it waits
at the chosen write (so the kill lands exactly there) or raises ENOSPC. Nothing in core knows.

Then we check what a learner would: the run is still listed and loads, its metrics are readable,
the job says what happened, and Resume continues from the last whole checkpoint to the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.lab import jobs, runs
from core.gpt.errors import GlassBoxError
from core.lab.errors import CorruptRunError
from core.gpt.model import GPT, GPTConfig
from core.lab.models import load_model_run, save_model_run
from core.gpt.tokenizers import train_char

REPO = Path(__file__).resolve().parent.parent
STEPS, EVERY = 30, 10  # checkpoints at steps 10, 20, 30; the faults hit the one at step 20
TINY = ["--preset", "tiny", "--context-length", "16", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
        "--batch-size", "4", "--eval-every", "1000", "--eval-batches", "1", "--sample-every", "1000",
        "--sample-tokens", "4", "--log-every", "1", "--checkpoint-every", str(EVERY)]

# Loaded by the child as `sitecustomize` (PYTHONPATH), so it runs before `core` does anything.
FAULT_HOOK = r'''
import errno, os, tempfile, time
from pathlib import Path

KIND = os.environ.get("GLASSBOX_TEST_FAULT")
if KIND:
    import core.lab.runs as runs

    MARKER = Path(os.environ["GLASSBOX_TEST_FAULT_MARKER"])
    STAGING = "checkpoint.next"
    real_write, real_append, real_replace = runs.write_bytes_atomic, runs.append_jsonl, os.replace
    seen = {"staged": 0, "moved": 0}

    def wait_to_be_killed():
        MARKER.write_text(str(os.getpid()))
        time.sleep(600)

    def write_bytes_atomic(path, data):
        path = Path(path)
        if path.parent.name == STAGING and path.name == "model.safetensors":
            seen["staged"] += 1
            if seen["staged"] == 2 and KIND == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device")
            if seen["staged"] == 2 and KIND == "kill-writing":
                fd, _ = tempfile.mkstemp(dir=path.parent, prefix=".model.safetensors.", suffix=".tmp")
                os.write(fd, data[: len(data) // 2])  # half a file, as a crash mid-write leaves it
                wait_to_be_killed()
        return real_write(path, data)

    def append_jsonl(path, record):
        if KIND == "enospc-metrics" and Path(path).name == "metrics.jsonl" and record.get("step") == 15:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        if KIND == "kill-step" and Path(path).name == "metrics.jsonl" and record.get("step") == 15:
            with open(path, "a") as f:
                f.write('{"step": 15, "train_lo')  # a line cut off mid-write
            wait_to_be_killed()
        return real_append(path, record)

    def replace(src, dst, *args, **kwargs):
        src, dst_path = Path(src), Path(dst)
        if (KIND == "kill-moving" and src.parent.name == STAGING and dst_path.parent.name != STAGING
                and src.name == "model.safetensors"):
            seen["moved"] += 1
            if seen["moved"] == 2:  # train_state.safetensors is already in place, the rest is not
                wait_to_be_killed()
        return real_replace(src, dst, *args, **kwargs)

    runs.write_bytes_atomic, runs.append_jsonl, os.replace = write_bytes_atomic, append_jsonl, replace
'''


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("GLASSBOX_THREADS", "1")  # small models on a shared machine


@pytest.fixture
def fault(tmp_path):
    """`fault(kind)` → the extra environment that arms the hook in one job's child process."""
    hook_dir = tmp_path / "fault_hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(FAULT_HOOK)
    marker = tmp_path / "fault.marker"

    def arm(kind: str) -> dict:
        return {"PYTHONPATH": str(hook_dir), "GLASSBOX_TEST_FAULT": kind,
                "GLASSBOX_TEST_FAULT_MARKER": str(marker)}

    arm.marker = marker
    return arm


def wait_for(condition, timeout=90.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def pretrain_argv(run_id: str, steps: int = STEPS) -> list[str]:
    return ["pretrain", "--data", "the-verdict", "--tokenizer", "char", *TINY, "--steps", str(steps),
            "--run-id", run_id]


def wait_until_ended(run_id: str) -> jobs.JobState:
    return wait_for(lambda: (s := jobs.job_state(run_id)) and not s.active and s)


def checkpoint_step(run_id: str) -> int:
    return runs.read_json(runs.run_dir(run_id) / "train_state.json")["step"]


def first_step_after_resume(run_id: str) -> int:
    """The first progress line the resumed session printed into job.log."""
    log = (runs.run_dir(run_id) / "job.log").read_text(errors="replace")
    resumed = log.rsplit("--resume", 1)[1]
    return int(next(line.split("|")[0].split()[1] for line in resumed.splitlines() if line.startswith("step ")))


def training_steps(run_id: str) -> list[int]:
    return [m["step"] for m in runs.read_jsonl(runs.run_dir(run_id) / "metrics.jsonl") if "train_loss" in m]


# ---------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("kind, resumes_from", [
    # (A kill mid-step, between checkpoints, is tests/test_pretrain.py's SIGKILL test; the hook's
    # "kill-step" fault does it with a half-written metrics line, and is left out here for time.)
    ("kill-writing", 10),  # mid-checkpoint: half of the step-20 weights are in checkpoint.next/
    ("kill-moving", 20),   # mid-checkpoint: step 20 is whole in checkpoint.next/, one file moved
])
def test_a_job_killed_mid_step_or_mid_checkpoint_keeps_its_checkpoint_and_resumes(fault, kind, resumes_from):
    run_id = f"killed-{kind}"
    jobs.start_job(pretrain_argv(run_id), run_id, env=fault(kind))
    wait_for(fault.marker.exists)
    os.killpg(jobs.job_state(run_id).pid, signal.SIGKILL)  # the plug is pulled: nothing is saved

    state = wait_until_ended(run_id)
    assert state.state == "failed" and "ended unexpectedly" in state.message
    assert "last checkpoint is kept" in state.message and "resume" in state.message
    # The run is whole: listed, loadable, its metrics readable (a cut-off line is skipped).
    assert [r.id for r in runs.list_runs("pretrain")] == [run_id] and not runs.list_runs()[0].error
    model, tokenizer, config = load_model_run(run_id)
    assert config["model"]["n_embd"] == 16 and tokenizer.vocab_size > 20
    assert checkpoint_step(run_id) == 10  # train_state.json is moved last: it still says 10
    assert training_steps(run_id)[:10] == list(range(1, 11))

    jobs.resume_job(run_id)
    final = wait_until_ended(run_id)
    assert final.state == "finished", final.log_tail
    assert first_step_after_resume(run_id) == resumes_from + 1
    assert final.result["steps"] == STEPS and checkpoint_step(run_id) == STEPS
    assert training_steps(run_id) == list(range(1, STEPS + 1))  # rows past the checkpoint replaced
    assert not (runs.run_dir(run_id) / "checkpoint.next").exists()
    load_model_run(run_id)


# ---------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("kind, says", [
    ("enospc", ["Could not save a checkpoint at step 20 (No space left on device)",
                "the checkpoint from step 10 is kept", "Free some disk space and resume"]),
    ("enospc-metrics", ["No space left on device", "metrics.jsonl", "The last checkpoint is kept",
                        "free some space and resume"]),
], ids=["while checkpointing", "while logging metrics"])
def test_disk_full_fails_the_job_clearly_and_keeps_the_last_checkpoint(fault, kind, says):
    jobs.start_job(pretrain_argv("full"), "full", env=fault(kind))
    state = wait_until_ended("full")
    assert state.state == "failed"
    for words in says:
        assert words in state.error, state.error
    assert "Traceback" not in state.error and "Internal error" not in state.error
    assert checkpoint_step("full") == 10
    load_model_run("full")
    # Resuming after the disk has room again is tests/test_train.py's disk-full test (in-process);
    # a resumed job is what the SIGKILL tests above check.


# ---------------------------------------------------------------------------- server restart


def restart_probe():
    """What a fresh page finds after a restart: the remembered run and its job controls."""
    import streamlit as st

    from pages._ui import job_controls, remembered_run

    run_id = remembered_run("pretrain_run", ("pretrain",), "pretrain")
    st.markdown(f"found: {run_id}")
    if run_id:
        job_controls(run_id, key="probe")


def test_a_restarted_server_finds_the_running_job_and_can_stop_it():
    # The "old server": another process starts the job and then goes away.
    code = ("import json, sys; from core.lab import jobs; "
            "jobs.start_job(json.loads(sys.argv[1]), 'restarted')")
    subprocess.run([sys.executable, "-c", code, json.dumps(pretrain_argv("restarted", steps=100_000))],
                   cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True, timeout=60)
    wait_for(lambda: jobs.job_state("restarted").state == "running"
             and (runs.run_dir("restarted") / "train_state.json").exists())

    # The "new server": nothing in memory, only what is on disk.
    assert [s.run_id for s in jobs.active_jobs()] == ["restarted"]
    at = AppTest.from_function(restart_probe, default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    assert "found: restarted" in at.markdown[0].value
    assert "running" in at.markdown[1].value
    page4 = REPO / "pages" / "4_Pretraining.py"
    if page4.exists():
        fresh = AppTest.from_file(str(page4), default_timeout=60)
        fresh.run()
        assert not fresh.exception, fresh.exception
        shown = [str(getattr(e, "value", "")) for e in (*fresh.selectbox, *fresh.markdown, *fresh.caption)]
        assert any("restarted" in text for text in shown), shown

    at.button(key="probe-stop").click().run()  # Stop from the new server: checkpoint, then end
    final = wait_until_ended("restarted")
    assert final.state == "stopped", final.log_tail
    assert checkpoint_step("restarted") == final.result["steps"] > 0


# ---------------------------------------------------------------------------- damaged files


def make_model_run(run_id: str) -> None:
    tokenizer = train_char("abcdefghijklmnopqrstuvwxyz ,.")
    torch.manual_seed(0)
    runs.create_run(run_id, "pretrain", {"data": "the-verdict"})
    save_model_run(run_id, GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, n_embd=16,
                                         n_head=2, n_layer=1)), tokenizer)
    for step in (1, 2, 3):
        runs.append_jsonl(runs.run_dir(run_id) / "metrics.jsonl", {"step": step, "train_loss": 3.0 - step / 10})
    runs.write_status(run_id, "finished")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "model.safetensors truncated": ("model.safetensors", truncate),
    "model.safetensors garbage": ("model.safetensors", lambda p: p.write_bytes(os.urandom(4096))),
    "model.safetensors empty": ("model.safetensors", lambda p: p.write_bytes(b"")),
    "config.json truncated": ("config.json", truncate),
    "config.json not an object": ("config.json", lambda p: p.write_text("[1, 2, 3]")),
    "config.json not UTF-8": ("config.json", lambda p: p.write_bytes(b'{"stage": "\xff\xfe"}')),
    "tokenizer.json truncated": ("tokenizer.json", truncate),
    "status.json truncated": ("status.json", truncate),
    "metrics.jsonl damaged": ("metrics.jsonl", lambda p: p.write_bytes(
        p.read_bytes() + b"\xff\xfe\x00garbage\n" + b'[1, 2]\n{"step": 4, "train_lo')),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_named_and_other_runs_still_list_and_load(damage):
    name, spoil = DAMAGE[damage]
    make_model_run("good")
    make_model_run("bad")
    spoil(runs.run_dir("bad") / name)

    listed = {r.id: r for r in runs.list_runs()}
    assert set(listed) == {"good", "bad"}  # a damaged run never hides the others
    load_model_run("good")
    assert [m["step"] for m in runs.open_run("good").metrics()] == [1, 2, 3]
    if name == "metrics.jsonl":
        assert [m["step"] for m in runs.open_run("bad").metrics()] == [1, 2, 3]  # bad lines skipped
        load_model_run("bad")
        return
    if name == "status.json":  # the job's state is unknown, and says why; the run itself is fine
        state = jobs.job_state("bad")
        assert state.state == "unknown" and "status.json is damaged" in state.message
        load_model_run("bad")
        return
    with pytest.raises(GlassBoxError) as error:
        load_model_run("bad")
    assert name in str(error.value), str(error.value)
    assert len(str(error.value).splitlines()) == 1
    if name == "config.json":
        assert isinstance(error.value, CorruptRunError)
        assert name in listed["bad"].error  # the list shows the run as damaged, with the reason


def page_text(at: AppTest) -> str:
    parts = [e.value for kind in ("error", "warning", "info", "markdown", "caption") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


# Pages that let the learner pick a model run: (file, what to do first, the run picker's key).
MODEL_PAGES = {
    "2": ("2_Attention.py", None, "model_run"),
    "3": ("3_Architecture.py", ("radio", "gen_source", "A run on disk"), "gen_run"),
    "4": ("4_Pretraining.py", None, "pt_shown"),
}


@pytest.mark.parametrize("page, damage", [
    ("2", "model.safetensors truncated"), ("2", "config.json truncated"),
    ("3", "model.safetensors truncated"), ("3", "tokenizer.json truncated"),
    ("4", "metrics.jsonl damaged"), ("4", "config.json truncated"), ("4", "status.json truncated"),
])
def test_pages_show_a_message_not_a_traceback_when_the_picked_run_is_damaged(page, damage):
    file, first, picker_key = MODEL_PAGES[page]
    if not (REPO / "pages" / file).exists():
        pytest.skip(f"pages/{file} is not written yet")
    name, spoil = DAMAGE[damage]
    make_model_run("good")
    make_model_run("bad")
    spoil(runs.run_dir("bad") / name)
    at = AppTest.from_file(str(REPO / "pages" / file), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    if first:
        kind, key, value = first
        getattr(at, kind)(key=key).set_value(value).run()
        assert not at.exception, at.exception
    picker = at.selectbox(key=picker_key)
    if not any(label.startswith("bad") for label in picker.options):  # damaged config: not offered
        assert name == "config.json", picker.options
        return
    picker.set_value("bad").run()
    assert not at.exception, at.exception
    if name == "status.json":  # the job panel says the state is unknown, and why
        assert "status.json is damaged" in page_text(at), page_text(at)
    elif page != "4" and name != "metrics.jsonl":  # page 4 draws metrics: it never needs the weights
        assert any(name in e.value for e in at.error), page_text(at)


def test_page_5_shows_a_message_when_a_classifier_s_weights_are_damaged():
    from tests.test_page_5 import make_finished_classifier, make_start_run

    make_finished_classifier("spam-run", make_start_run())
    truncate(runs.run_dir("spam-run") / "model.safetensors")
    at = AppTest.from_file(str(REPO / "pages" / "5_Classification.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    at.text_area[0].set_value("WIN a free cruise now")
    next(b for b in at.button if b.label == "Classify").click().run()
    assert not at.exception, at.exception
    assert any("model.safetensors" in e.value for e in at.error), page_text(at)


def make_stage_run(run_id: str, stage: str, files: dict[str, bytes], config: dict | None = None) -> Path:
    run = runs.create_run(run_id, stage, config or {})
    for name, content in files.items():
        (run.path / name).write_bytes(content)
    runs.write_status(run_id, "finished")
    return run.path


HALF_JSON = b'{"test_accuracy": 0.9, "val_acc'


@pytest.mark.parametrize("page, stage, files", [
    ("5_Classification.py", "classify", {"results.json": HALF_JSON}),
    ("6_Instructions.py", "instruct", {"format_rates.json": HALF_JSON}),
    ("6_Instructions.py", "instruct", {"format_rates.json": b'{"start": 0.1, "tuned": 0.9, "n": 3, '
                                                             b'"max_new_tokens": 8}',
                                       "responses.json": b"[{\"instruction\": \"x\""}),
    ("7_Judge.py", "judge", {"summary.json": HALF_JSON, "judgements.jsonl": b'{"item": 1, "sco'}),
], ids=["5-results", "6-format-rates", "6-responses", "7-summary"])
def test_pages_5_6_7_show_an_error_for_a_damaged_results_file(page, stage, files):
    config = {"labels": ["base", "tuned"]} if stage == "judge" else {}
    make_stage_run("damaged", stage, files, config)
    at = AppTest.from_file(str(REPO / "pages" / page), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    damaged = [n for n, content in files.items() if n.endswith(".json")]
    assert any(any(n in e.value for n in damaged) for e in at.error), page_text(at)
