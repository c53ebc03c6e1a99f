"""core.lab.device: threads for torch, and the allocator setting that training processes use."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.lab import device


def test_threads_follow_the_physical_cores_or_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("GLASSBOX_THREADS", raising=False)
        assert device.configure_threads() == device.physical_cores() == torch.get_num_threads()
        monkeypatch.setenv("GLASSBOX_THREADS", "1")
        assert device.configure_threads() == 1 == torch.get_num_threads()
        assert device.configure_ui_threads(job_running=True) == 1
    finally:
        torch.set_num_threads(before)


# A child process frees what one training step would (3 activations of 8 MiB) and prints how many
# MiB of freed memory glibc's malloc kept for the next step (mallinfo2's `fordblks`).
FREED_AND_KEPT = """
import ctypes, sys, torch
from core.lab import device
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "reuse":
    assert device.reuse_freed_memory()
kept = [torch.ones(2 * 2**20) for _ in range(3)]  # 3 x 8 MiB, written in full
del kept
print(libc.mallinfo2().fordblks / 2**20)
"""


def _mib_kept_after_a_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FREED_AND_KEPT, mode], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120, check=True)
    return float(out.stdout.split()[-1])


def _glibc_version() -> tuple:
    name, version = platform.libc_ver()
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()


@pytest.mark.skipif(_glibc_version() < (2, 33),
                    reason="the setting exists in glibc only (mallinfo2 since 2.33)")
def test_reuse_freed_memory_keeps_a_steps_activations_for_the_next_step():
    # By default glibc hands these blocks back to the kernel (the next step faults them in again).
    assert _mib_kept_after_a_step("default") < 8
    assert _mib_kept_after_a_step("reuse") >= 24


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_learns_and_resumes_exactly():
    from core.gpt.model import GPT, GPTConfig
    from core.gpt.pretrain import LanguageModelTask
    from core.gpt.train import TrainConfig
    from core.lab import runs
    from core.lab.training import train

    text = "the cat sat on the mat. the dog sat on the log. " * 60
    vocab = sorted(set(text))
    ids = [vocab.index(c) for c in text]

    def run(run_id, **kw):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=len(vocab), context_length=16, n_embd=32, n_head=2, n_layer=2))
        config = TrainConfig(max_steps=40, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=20, eval_batches=2,
                             sample_every=1000, checkpoint_every=20, log_every=1, seed=3)
        return train(run_id, model, LanguageModelTask(ids, 16), config, device=torch.device("cuda"), **kw)

    runs.create_run("cuda", "pretrain", {})
    result = run("cuda")
    first = runs.read_jsonl(runs.run_dir("cuda") / "metrics.jsonl")[0]["train_loss"]
    assert result["train_loss"] < first - 0.5 and result["steps"] == 40
    runs.create_run("cuda-stop", "pretrain", {})
    stop = lambda r: r.get("step") == 20 and "train_loss" in r and runs.request_stop("cuda-stop")  # noqa: E731
    assert run("cuda-stop", progress=stop)["steps"] == 20
    runs.clear_stop("cuda-stop")
    resumed = run("cuda-stop", resume=True)
    assert resumed["train_loss"] == pytest.approx(result["train_loss"], abs=1e-4)
