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
