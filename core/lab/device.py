"""Which device trains the model, and how many CPU threads it may use.

Measured on a 2-core CPU: torch is fastest with threads = physical cores (4 threads on 2 cores
ran 2× slower), and bf16 is ~100× slower than fp32 there, so the CPU always trains in fp32.
On CUDA the training loop may use bf16 autocast; Apple's MPS is used when present.
"""

from __future__ import annotations

import os
import platform


def physical_cores() -> int:
    """Physical cores (not hyper-threads) available to this process."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        available = os.cpu_count() or 1
    cores = _linux_physical_cores()
    return max(1, min(available, cores) if cores else available)


def _linux_physical_cores() -> int | None:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    pairs = set()
    physical, core = None, None
    for line in text.splitlines():
        if line.startswith("physical id"):
            physical = line.split(":")[1].strip()
        elif line.startswith("core id"):
            core = line.split(":")[1].strip()
        elif not line.strip() and core is not None:
            pairs.add((physical, core))
            physical, core = None, None
    if core is not None:
        pairs.add((physical, core))
    return len(pairs) or None


def configure_threads(threads: int | None = None) -> int:
    """Give torch one thread per physical core (or GLASSBOX_THREADS); returns the count."""
    import torch

    wanted = threads or int(os.environ.get("GLASSBOX_THREADS", 0) or 0) or physical_cores()
    torch.set_num_threads(wanted)
    return wanted


# glibc's mallopt() parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for the next step instead of returning it to the kernel.

    A training step allocates and frees the same activation tensors every step (`small`: several
    4 MiB ones). By default glibc hands blocks that big back to the kernel when they are freed, so the
    next step page-faults them in again: measured 2,000–7,000 page faults per `small` step, and 3–7%
    of its time. With this, ~20 faults per step. The cost is that the process keeps its peak memory,
    which a training process reaches every step anyway. Blocks over 32 MiB (glibc's limit) still go
    straight to the kernel. Returns False where the C library is not glibc (macOS, musl): a no-op.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)  # blocks up to 32 MiB come from the reusable heap
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap after a free ...
    ok &= mallopt(_M_TOP_PAD, 64 * 2**20)  # ... and grow it in 64 MiB steps, not page by page
    return bool(ok)


def configure_ui_threads(job_running: bool) -> int:
    """Threads for the app's own process: one while a training job holds the cores.

    Measured on 2 cores: with a job training on both, 2-thread torch work in the app (generation,
    attention maps) slowed ~50× from oversubscription, while 1 thread stayed quick.
    """
    return configure_threads(1 if job_running else None)


def pick_device(prefer: str | None = None):
    """CUDA if present, then Apple MPS, else CPU (or GLASSBOX_DEVICE / `prefer` if given)."""
    import torch

    choice = prefer or os.environ.get("GLASSBOX_DEVICE")
    if choice:
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe() -> dict:
    """What the home page shows about the machine."""
    import torch

    device = pick_device()
    info = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "physical_cores": physical_cores(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
