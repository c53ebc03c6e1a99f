"""Data parallel training: 2 processes (gloo on CPU, over 127.0.0.1) compute the same steps as one.

Each process takes its own half of every global batch and DistributedDataParallel averages the
gradients, so the losses match a single process given the same global batch (to float tolerance).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from core.lab import runs

REPO = Path(__file__).resolve().parent.parent
TEXT = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n" * 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain(launcher: list[str], run_id: str, corpus: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), GLASSBOX_THREADS="1")
    args = ["--data", f"file:{corpus}", "--preset", "tiny", "--context-length", "32", "--batch-size", "8",
            "--steps", "6", "--eval-every", "3", "--log-every", "1", "--sample-tokens", "10",
            "--run-id", run_id, "--quiet"]
    done = subprocess.run([*launcher, "-m", "core", "pretrain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(240)
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    parallel = pretrain(torchrun, "ddp", corpus)
    single = pretrain([sys.executable], "single", corpus)

    assert parallel["steps"] == single["steps"] == 6
    assert parallel["tokens"] == single["tokens"] == 6 * 8 * 32  # the global batch, counted once
    assert parallel["train_loss"] == pytest.approx(single["train_loss"], abs=1e-4)
    assert parallel["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)
    a = runs.read_jsonl(runs.run_dir("ddp") / "metrics.jsonl")
    b = runs.read_jsonl(runs.run_dir("single") / "metrics.jsonl")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]  # rank 0 alone wrote
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-4)
    assert runs.open_run("ddp").config["world_size"] == 2
