"""Which device trains the model, and how many CPU threads it may use.

Measured on a 2-core CPU: torch is fastest with threads = physical cores (4 threads on 2 cores
ran 2× slower), and bf16 is ~100× slower than fp32 there, so the CPU always trains in fp32.
On CUDA the training loop may use bf16 autocast; Apple's MPS is used when present.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch
import torch.distributed as dist

from core.gpt.errors import TrainingError


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


def configure_training_threads() -> int:
    """One thread per physical core, shared out between the processes `torchrun` put on this machine.

    Also tells the C allocator to keep freed memory for the next step (see `reuse_freed_memory`).
    On a machine whose cores are already busy (load average above the core count, before this
    process has started working) it takes one thread: measured here at load 19 on 2 cores, one
    `base` optimiser step took 3.3 s on 1 thread and 15 s on 2 (OpenMP threads spin-waiting for a
    core). GLASSBOX_THREADS always wins.
    """
    reuse_freed_memory()
    if os.environ.get("GLASSBOX_THREADS"):
        return configure_threads()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = physical_cores()
    if local_processes > 1:
        return configure_threads(max(1, cores // local_processes))
    return configure_threads(1 if _machine_busy(cores) else cores)


def _machine_busy(cores: int) -> bool:
    try:
        return os.getloadavg()[0] > cores
    except (OSError, AttributeError):  # not on every platform
        return False


def available_memory_bytes(device) -> int | None:
    """Free memory on the device (CUDA) or in the machine (RAM); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_training_memory(model, batch_size: int, seq_len: int) -> int:
    """A rough upper estimate, in bytes, of what one fp32 training step needs.

    Weights, gradients and AdamW's two moments: 4 copies of every parameter. Activations kept for
    the backward pass: per layer about 20 numbers per token per channel plus the attention maps
    (n_head × T × T per sequence, a few copies), and the logits with their gradient (B × T × V).
    """
    n_params = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", None)
    n_layer = getattr(cfg, "n_layer", 1)
    n_embd = getattr(cfg, "n_embd", 0)
    n_head = getattr(cfg, "n_head", 1)
    vocab = getattr(cfg, "vocab_size", 0)
    tokens = batch_size * seq_len
    per_layer = tokens * 20 * n_embd + 3 * batch_size * n_head * seq_len * seq_len
    activations = n_layer * per_layer + 3 * tokens * vocab + 4 * tokens * n_embd
    return 4 * (4 * n_params + activations)


def check_memory(model, batch_size: int, seq_len: int, device) -> None:
    """Refuse, before anything big is allocated, a model and batch that cannot fit."""
    need = estimate_training_memory(model, batch_size, seq_len)
    free = available_memory_bytes(device)
    if free is not None and need > 0.8 * free:
        raise TrainingError(
            f"This model and batch need about {need / 2**30:.1f} GiB to train, but only "
            f"{free / 2**30:.1f} GiB is free. Choose a smaller preset, a smaller batch size "
            "(use gradient accumulation to keep the effective batch) or a shorter context."
        )


def distributed_context() -> tuple[int, int]:
    """(rank, world_size), starting the process group if launched by `torchrun`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def training_device(device=None, rank: int = 0, world: int = 1):
    """The device this process trains on (one GPU per process under torchrun), set up for speed."""
    if device is None:
        device = pick_device()
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    return device
