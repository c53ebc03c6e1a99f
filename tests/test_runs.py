"""The run store: ids that cannot escape, atomic writes that survive SIGKILL, damaged files named."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from core.lab import runs
from core.lab.paths import REPO_ROOT
from core.lab.errors import CorruptRunError, RunError, RunExistsError, RunNotFoundError


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "/abs", "a\\b", ".hidden", "_jobs",
                                 "x" * 65, "a..b", "tab\tid", None, 42])
def test_bad_run_ids_are_refused(bad):
    with pytest.raises(RunError):
        runs.validate_run_id(bad)


def test_create_open_list_delete():
    run = runs.create_run("pre-1", "pretrain", {"model": {"n_layer": 2}}, parent="tok-1")
    assert run.path.is_dir() and run.stage == "pretrain" and run.parent == "tok-1"
    assert runs.open_run("pre-1").config["model"] == {"n_layer": 2}
    runs.create_run("tok-1", "tokenizer", {})
    assert {r.id for r in runs.list_runs()} == {"pre-1", "tok-1"}
    assert [r.id for r in runs.list_runs("tokenizer")] == ["tok-1"]
    with pytest.raises(RunExistsError):
        runs.create_run("pre-1", "pretrain", {})
    assert runs.create_run("pre-1", "pretrain", {}, resume=True).config["model"] == {"n_layer": 2}
    runs.delete_run("pre-1")
    with pytest.raises(RunNotFoundError):
        runs.open_run("pre-1")


def test_tensors_round_trip_and_damage_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    runs.save_tensors(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"step": 7})
    assert torch.equal(runs.load_tensors(path)["w"], torch.arange(6.0).reshape(2, 3))
    assert runs.tensors_metadata(path) == {"step": "7"}
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CorruptRunError, match="model.safetensors"):
        runs.load_tensors(path)


def test_damaged_run_is_listed_not_fatal():
    runs.create_run("good", "pretrain", {})
    bad = runs.create_run("bad", "pretrain", {})
    (bad.path / "config.json").write_text("{ not json")
    listed = {r.id: r for r in runs.list_runs()}
    assert listed["good"].error is None
    assert "config.json" in listed["bad"].error
    with pytest.raises(CorruptRunError, match="config.json"):
        runs.open_run("bad")


def test_truncated_metrics_line_is_skipped():
    run = runs.create_run("m", "pretrain", {})
    for step in range(3):
        runs.append_jsonl(run.path / "metrics.jsonl", {"step": step, "loss": float("nan") if step == 1 else 1.0})
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-write
    metrics = runs.open_run("m").metrics()
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[1]["loss"] is None  # NaN stored as null, still valid JSON


def test_writer_killed_mid_save_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that keeps overwriting a checkpoint: what is on disk always loads."""
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / "model.safetensors"
    runs.save_tensors(path, {"w": torch.zeros(256, 1024)})
    writer = textwrap.dedent(f"""
        import torch
        from core.lab import runs
        i = 0
        while True:
            i += 1
            runs.save_tensors({str(path)!r}, {{"w": torch.full((256, 1024), float(i))}})
    """)
    for delay in (0.3, 0.55, 0.8):
        before = path.stat().st_mtime_ns
        proc = subprocess.Popen([sys.executable, "-c", writer], cwd=REPO_ROOT,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        deadline = time.monotonic() + 60
        while path.stat().st_mtime_ns == before and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until the writer is really writing
        assert proc.poll() is None, "the writer died on its own"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        w = runs.load_tensors(path)["w"]
        assert w.shape == (256, 1024)
        assert torch.all(w == w[0, 0])  # one whole version, never a mix
    assert w[0, 0] > 0  # the writer really overwrote it many times
    leftovers = [p for p in folder.iterdir() if p.name != "model.safetensors"]
    assert all(p.name.endswith(".tmp") for p in leftovers)


def test_two_sessions_racing_for_one_id_one_wins():
    results = []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        try:
            runs.create_run("same-id", "pretrain", {"who": i})
            results.append(("won", i))
        except RunExistsError:
            results.append(("refused", i))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for outcome, i in results if outcome == "won"]
    assert len(winners) == 1
    assert runs.open_run("same-id").config["who"] == winners[0]


def test_status_and_stop_request():
    runs.create_run("s", "pretrain", {})
    runs.write_status("s", "running", pid=123)
    assert runs.read_status("s")["state"] == "running"
    assert not runs.stop_requested("s")
    runs.request_stop("s")
    assert runs.stop_requested("s")
    runs.clear_stop("s")
    assert not runs.stop_requested("s")


def test_a_symlink_planted_in_a_run_folder_is_never_written_through(tmp_path):
    """Issue 22: a run folder copied from elsewhere may hold links to files outside the store."""
    run = runs.create_run("planted", "pretrain", {"model": {}})
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    for name in ("metrics.jsonl", "stop.request", "job.log"):
        (run.path / name).symlink_to(outside)
    with pytest.raises(CorruptRunError, match="symbolic link"):
        runs.append_jsonl(run.path / "metrics.jsonl", {"step": 1})
    with pytest.raises(CorruptRunError, match="symbolic link"):
        runs.open_append(run.path / "job.log", binary=True)
    runs.request_stop("planted")  # replaces the link itself
    assert runs.stop_requested("planted")
    assert not (run.path / "stop.request").is_symlink()
    assert outside.read_text() == "precious\n"
