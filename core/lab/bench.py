"""How fast is this machine, and how much of it does the engine use? (`python -m core bench`)

Every figure here is measured in one run, on the machine in front of you, so ratios compare like
with like (the machine may be busy with other work; run the benchmark twice and compare):

- `matmul_gflops`: what one big matrix multiply reaches — the practical peak of this machine;
- `training_speed`: tokens per second of real training steps (forward, backward, gradient
  clipping, fused AdamW — the same pieces `core.gpt.train` uses) and **MFU**, the model FLOPs
  utilisation: model FLOPs per token × tokens/s ÷ the matmul peak;
- `fast_vs_teaching`: the fast model path (SDPA, fused Q/K/V, built-in LayerNorm/GELU) over the
  readable from-scratch path of stage 2, same weights, alternating rounds to cancel noise;
- `kv_cache_speedup`: greedy generation with the KV cache over recomputing every step;
- `bpe_train_s`: seconds to train our byte-level BPE to 1,000 tokens on Tiny Shakespeare;
- `first_point_s`: seconds from starting a pre-training job to its first logged loss;
- `time_to_val_loss`: seconds until the `small` preset reaches validation loss ≤ 1.88 (slow).

Functions here only measure and return dicts of figures; `core/stages/bench.py` prints them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import string
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from core.gpt.errors import GlassBoxError
from core.gpt.model import GPT, preset_config
from core.gpt.pretrain import default_tokenizer, recipe
from core.gpt.tokenizers import train_bpe, train_char, train_word
from core.gpt.train import TrainConfig, make_optimizer
from core.lab import data, jobs, runs, snapshots
from core.lab.device import configure_threads, pick_device, reuse_freed_memory
from core.lab.models import save_model_run
from core.lab.paths import REPO_ROOT

CHAR_VOCAB = 65  # Tiny Shakespeare has 65 distinct characters: the vocabulary of `small`'s target


# ---------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock measures the work and not just its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast_dtype(device: torch.device):
    """The dtype training computes in: bf16 autocast on CUDA (as core.gpt.train does), else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def cpu_share(cpu_seconds: float, wall_seconds: float, device: torch.device) -> float | None:
    """The share of the CPU time its threads asked for that this process got (CPU runs only).

    Near 1 on a quiet machine; well below 1 when other programs share the cores, and then every
    wall-clock figure of the benchmark is low. (None on a GPU: the CPU mostly waits there.)
    """
    if device.type != "cpu" or wall_seconds <= 0:
        return None
    return cpu_seconds / (wall_seconds * torch.get_num_threads())


def _device(device=None) -> torch.device:
    return torch.device(device) if device is not None else pick_device()


# ---------------------------------------------------------------------------- matmul peak


def matmul_gflops(sizes=(1024, 2048), repeats: int = 5, device=None, dtype=None) -> dict:
    """Best GFLOP/s of square matrix multiplies (2·n³ FLOPs each), best of `repeats` per size.

    On the CPU: fp32, with torch threads = physical cores. On CUDA: in the dtype training uses
    (bf16), so MFU compares the model with the peak of the same arithmetic.
    """
    device = _device(device)
    threads = configure_threads() if device.type == "cpu" else torch.get_num_threads()
    if dtype is None:
        dtype = _autocast_dtype(device) or torch.float32
    by_size = {}
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for n in sizes:
        g = torch.Generator(device="cpu").manual_seed(n)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        a @ b  # warm-up: first call allocates and picks kernels
        _sync(device)
        best = math.inf
        inner = 20 if device.type == "cuda" else 1  # a GPU multiply is too short to time alone
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(inner):
                a @ b
            _sync(device)
            best = min(best, (time.perf_counter() - start) / inner)
        by_size[n] = 2 * n**3 / best / 1e9
    share = cpu_share(time.process_time() - cpu_start, time.perf_counter() - wall_start, device)
    return {"matmul_gflops": max(by_size.values()), "matmul_by_size": by_size, "cpu_share": share,
            "matmul_dtype": str(dtype).replace("torch.", ""), "threads": threads, "device": device.type}


# ---------------------------------------------------------------------------- training speed


def _train_recipe(preset: str) -> dict:
    try:

        return recipe(preset)
    except ImportError:  # the stage-4 task is optional for the benchmark
        return {"batch_size": 32}


class _Trainer:
    """One model and its optimiser, stepping the way `core.gpt.train` steps (on random token ids).

    A step: forward under the training dtype, backward, `.item()` of the loss, gradient clipping,
    fused AdamW, zero the gradients. Batches are drawn once: data loading is not what we time.
    """

    def __init__(self, preset: str, vocab_size: int = CHAR_VOCAB, batch_size: int | None = None,
                 device=None, attention: str = "fast", seed: int = 0, **overrides):

        self.device = _device(device)
        reuse_freed_memory()  # as core.gpt.train does
        recipe = _train_recipe(preset)
        recipe.update({"max_steps": recipe.get("max_steps") or 100})
        if batch_size is not None:
            recipe["batch_size"] = batch_size
        self.train_config = TrainConfig.from_dict(recipe)
        torch.manual_seed(seed)
        self.model = GPT(preset_config(preset, vocab_size, attention=attention, **overrides)).to(self.device)
        self.model.train()
        self.optimizer = make_optimizer(self.model, self.train_config, self.device)
        cfg = self.model.config
        g = torch.Generator().manual_seed(seed)
        shape = (self.train_config.batch_size, cfg.context_length)
        self.inputs = torch.randint(cfg.vocab_size, shape, generator=g).to(self.device)
        self.targets = torch.randint(cfg.vocab_size, shape, generator=g).to(self.device)
        self.autocast = _autocast_dtype(self.device)

    @property
    def tokens_per_step(self) -> int:
        return self.inputs.numel()

    def step(self) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast is not None):
            _, loss = self.model(self.inputs, self.targets)
        loss.backward()
        value = loss.item()  # core.gpt.train reads the loss every step too (a GPU sync)
        clip = self.train_config.grad_clip
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def timed_steps(self, min_steps: int, min_seconds: float) -> tuple[int, float]:
        """Run at least `min_steps` steps and at least `min_seconds`; return (steps, seconds)."""
        _sync(self.device)
        start = time.perf_counter()
        steps = 0
        while steps < min_steps or time.perf_counter() - start < min_seconds:
            self.step()
            steps += 1
        _sync(self.device)
        return steps, time.perf_counter() - start


def training_speed(preset: str = "small", peak_gflops: float | None = None, warmup: int = 3,
                   min_steps: int = 10, min_seconds: float = 4.0, window_steps: int = 3,
                   vocab_size: int = CHAR_VOCAB, batch_size: int | None = None, device=None,
                   attention: str = "fast", **overrides) -> dict:
    """Training tokens/s of a preset at its recipe's batch size and context; MFU if a peak is given.

    Steps are timed in short windows of `window_steps`; the fastest window is the figure (other
    work on a shared machine only ever slows a window down) and the mean over all is kept too.
    MFU = flops_per_token (nanoGPT's count: 6·N + attention) × tokens/s ÷ peak FLOP/s.
    """
    if _device(device).type == "cpu":
        configure_threads()
    trainer = _Trainer(preset, vocab_size, batch_size, device, attention, **overrides)
    for _ in range(warmup):  # first steps allocate memory and create the optimiser state
        trainer.step()
    windows = []  # seconds per step of each window
    total_steps, total_seconds = 0, 0.0
    cpu_start = time.process_time()
    while total_steps < min_steps or total_seconds < min_seconds:
        steps, seconds = trainer.timed_steps(min(window_steps, max(1, min_steps)), 0.0)
        windows.append(seconds / steps)
        total_steps, total_seconds = total_steps + steps, total_seconds + seconds
    cpu_seconds = time.process_time() - cpu_start
    tokens_per_s = trainer.tokens_per_step / min(windows)
    flops = trainer.model.flops_per_token()
    out = {
        "preset": preset, "tokens_per_s": tokens_per_s, "ms_per_step": 1000 * min(windows),
        "tokens_per_s_mean": total_steps * trainer.tokens_per_step / total_seconds,
        "steps": total_steps, "batch_size": trainer.train_config.batch_size,
        "context_length": trainer.model.config.context_length, "vocab_size": vocab_size,
        "parameters": trainer.model.num_parameters(), "flops_per_token": flops,
        "model_gflops": flops * tokens_per_s / 1e9,
        "cpu_share": cpu_share(cpu_seconds, total_seconds, trainer.device),
    }
    if peak_gflops:
        out["mfu"] = out["model_gflops"] / peak_gflops
    return out


def fast_vs_teaching(preset: str = "small", rounds: int = 4, steps_per_round: int = 3, warmup: int = 2,
                     max_seconds: float = 60.0, vocab_size: int = CHAR_VOCAB, batch_size: int | None = None,
                     device=None, **overrides) -> dict:
    """Training tokens/s of the fast path over the teaching path: same model, same weights.

    One model switches path between rounds (fast, teaching, fast, teaching, …) so a burst of load
    from elsewhere hits both; each path keeps its fastest round. After two rounds, no new round
    starts once `max_seconds` have passed (the teaching path can be slow on a busy machine).
    """
    if _device(device).type == "cpu":
        configure_threads()
    trainer = _Trainer(preset, vocab_size, batch_size, device, "fast", **overrides)
    best = {"fast": math.inf, "teaching": math.inf}
    start = time.perf_counter()
    for path in best:
        trainer.model.set_attention(path)
        for _ in range(warmup):
            trainer.step()
    done = 0
    while done < rounds and (done < 2 or time.perf_counter() - start < max_seconds):
        for path in best:
            trainer.model.set_attention(path)
            steps, seconds = trainer.timed_steps(steps_per_round, 0.0)
            best[path] = min(best[path], seconds / steps)
        done += 1
    tokens = trainer.tokens_per_step
    return {"fast_vs_teaching": best["teaching"] / best["fast"],
            "tokens_per_s_fast": tokens / best["fast"], "tokens_per_s_teaching": tokens / best["teaching"],
            "preset": preset, "rounds": done}


# ---------------------------------------------------------------------------- generation


def kv_cache_speedup(preset: str = "base", new_tokens: int = 256, rounds: int = 2, vocab_size: int = 1000,
                     max_seconds: float = 20.0, device=None, **overrides) -> dict:
    """Greedy generation of `new_tokens` tokens from a 1-token prompt, without over with the cache.

    The context must hold the whole generation (else the window slides and the cache is
    rebuilt), so the context length is raised to fit if the preset's is shorter (`base`: 256
    already fits). Also checks that
    both ways produce the same tokens.
    """

    device = _device(device)
    if device.type == "cpu":
        configure_threads()
    torch.manual_seed(0)
    config = preset_config(preset, vocab_size, **overrides)
    if config.context_length < new_tokens:  # the model reads at most 1 + (new_tokens - 1) tokens
        config = preset_config(preset, vocab_size, **{**overrides, "context_length": new_tokens})
    model = GPT(config).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    timings = {True: math.inf, False: math.inf}
    outputs = {}
    began = time.perf_counter()
    for round_ in range(rounds):
        if round_ and time.perf_counter() - began > max_seconds:
            break  # a busy machine: one round has to do
        for use_cache in (True, False):
            _sync(device)
            start = time.perf_counter()
            outputs[use_cache] = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
            _sync(device)
            timings[use_cache] = min(timings[use_cache], time.perf_counter() - start)
    return {"kv_cache_speedup": timings[False] / timings[True],
            "kv_cache_identical": bool(torch.equal(outputs[True], outputs[False])),
            "generate_s_cache": timings[True], "generate_s_no_cache": timings[False],
            "new_tokens": new_tokens, "preset": preset, "context_length": config.context_length,
            "parameters": model.num_parameters()}


# ---------------------------------------------------------------------------- tokeniser


def bpe_train_s(vocab_size: int = 1000, data_name: str = "tinyshakespeare", max_chars: int | None = None) -> dict:
    """Seconds to train byte-level BPE to `vocab_size` tokens on a corpus (None + a note if it is missing)."""

    try:
        text = data.read_text(data_name)
    except GlassBoxError as e:
        return {"bpe_train_s": None, "bpe_note": f"skipped: {e}"}
    if max_chars:
        text = text[:max_chars]
    start = time.perf_counter()
    tokenizer = train_bpe(text, vocab_size)
    seconds = time.perf_counter() - start
    return {"bpe_train_s": seconds, "bpe_vocab_size": tokenizer.vocab_size, "bpe_chars": len(text),
            "bpe_data": data_name}


# ---------------------------------------------------------------------------- jobs


@contextmanager
def _temporary_checkpoints():
    """Point GLASSBOX_CHECKPOINTS_DIR at a fresh folder (children inherit it); remove it after."""
    folder = Path(tempfile.mkdtemp(prefix="glassbox-bench-"))
    before = os.environ.get("GLASSBOX_CHECKPOINTS_DIR")
    os.environ["GLASSBOX_CHECKPOINTS_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop("GLASSBOX_CHECKPOINTS_DIR", None)
        else:
            os.environ["GLASSBOX_CHECKPOINTS_DIR"] = before
        shutil.rmtree(folder, ignore_errors=True)


def _corpus_for_bench(preferred: str = "tinyshakespeare") -> str:
    """Tiny Shakespeare if it is here, else Python's docs (always installed)."""

    return preferred if data.find(preferred) is not None else "python-docs"


def _first_metric(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError:
        return None
    if not line.endswith("\n"):
        return None  # not written in full yet
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def first_point_s(preset: str = "tiny", timeout_s: float = 120.0, data_name: str | None = None) -> dict:
    """Seconds from `start_job(pretrain …)` to the first line of the job's metrics.jsonl.

    That is what a learner waits after pressing Train: a new process starts, imports torch, reads
    and encodes the corpus, builds the model and takes its first step. The job is stopped at once
    and its temporary run folder removed.
    """

    data_name = data_name or _corpus_for_bench()
    run_id = "bench-first-point"
    with _temporary_checkpoints() as folder:
        argv = ["pretrain", "--data", data_name, "--tokenizer", "char", "--preset", preset,
                "--steps", "100000", "--quiet", "--run-id", run_id]
        metrics = folder / run_id / "metrics.jsonl"
        start = time.perf_counter()
        jobs.start_job(argv, run_id)
        record, seconds, failure = None, None, None
        try:
            while time.perf_counter() - start < timeout_s:
                record = _first_metric(metrics)
                if record is not None:
                    seconds = time.perf_counter() - start
                    break
                state = jobs.job_state(run_id)
                if not state.active:
                    failure = f"the job ended as {state.state}: {state.error or state.log_tail[-300:]}"
                    break
                time.sleep(0.02)
            else:
                failure = f"no loss was logged within {timeout_s:.0f} s"
        finally:
            _stop_and_wait(run_id)
    out = {"first_point_s": seconds, "first_point_data": data_name, "first_point_preset": preset}
    if record is not None:
        out["first_point_step_elapsed_s"] = record.get("elapsed_s")
    if failure:
        out["first_point_note"] = failure
    return out


def _stop_and_wait(run_id: str, grace_s: float = 10.0) -> None:
    """End the benchmark's job at once (its checkpoint is not wanted) and wait until it is gone."""

    jobs.stop_job(run_id, force=True)
    deadline = time.perf_counter() + grace_s
    while time.perf_counter() < deadline:
        state = jobs.job_state(run_id)
        if not state.alive:
            return
        time.sleep(0.05)


def time_to_val_loss(preset: str = "small", target: float = 1.88, data_name: str = "tinyshakespeare",
                     timeout_s: float = 900.0, extra_args: tuple[str, ...] = ()) -> dict:
    """Train `preset` with its recipe on Tiny Shakespeare characters in a child process; seconds of
    training until the first evaluation at or below `target` (None if it never gets there).

    The recipe evaluates every few hundred steps, so the time is that of the first evaluation that
    shows the target, an upper bound on the moment it was crossed.
    """

    if data.find(data_name) is None:
        return {"time_to_val_loss_s": None, "time_to_val_loss_note": f"skipped: {data_name} is not available"}
    run_id = "bench-time-to-loss"
    with _temporary_checkpoints() as folder:
        argv = [sys.executable, "-m", "core", "pretrain", "--data", data_name, "--tokenizer", "char",
                "--preset", preset, "--quiet", "--run-id", run_id, *extra_args]
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        except subprocess.TimeoutExpired:
            return {"time_to_val_loss_s": None,
                    "time_to_val_loss_note": f"pretrain did not finish within {timeout_s:.0f} s"}
        wall = time.perf_counter() - start
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return {"time_to_val_loss_s": None, "time_to_val_loss_note": f"pretrain failed: {tail[0]}"}
        rows = [json.loads(line) for line in (folder / run_id / "metrics.jsonl").read_text().splitlines()
                if line.strip()]
    evals = [r for r in rows if r.get("val_loss") is not None]
    reached = next((r for r in evals if r["val_loss"] <= target), None)
    return {"time_to_val_loss_s": reached["elapsed_s"] if reached else None,
            "time_to_val_loss_step": reached["step"] if reached else None,
            "time_to_val_loss_target": target,
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "train_s": rows[-1]["elapsed_s"] if rows else None, "steps": rows[-1]["step"] if rows else None,
            "wall_s": wall, "preset": preset}


def history_redraw_s(presets=("small", "base"), rounds: int = 3) -> dict:
    """Seconds for the time slider to redraw one snapshot's views (core.lab.snapshots.views: load the
    fp16 snapshot, sample the probe text, per-token loss, attention maps, embedding map with a
    search, position similarity), on an untrained model of each preset. Best of `rounds`; `_cpu`:
    the CPU seconds of the same redraw (what it costs on a quiet machine)."""
    text = (string.ascii_letters + string.digits + " .,;:!?'\n-") * 20
    out: dict = {}
    shares: list[float] = []
    with _temporary_checkpoints():
        for preset in presets:
            tokenizer = train_char(text) if default_tokenizer(preset) == "char" else train_word(
                " ".join(f"w{i}" for i in range(1200)), 1000)
            model = GPT(preset_config(preset, tokenizer.vocab_size))
            run_id = f"bench-history-{preset}"
            runs.create_run(run_id, "pretrain", {"model": model.config.to_dict(),
                                                 "snapshots": {"budget_bytes": 2**30}})
            save_model_run(run_id, model, tokenizer)
            snapshots.Plan(2**30, model).save(runs.run_dir(run_id), model, 0)
            walls, cpus = [], []
            for _ in range(rounds):
                t, c = time.perf_counter(), time.process_time()
                snapshots.views(run_id, 0, query=tokenizer.token_text(1))
                walls.append(time.perf_counter() - t)
                cpus.append(time.process_time() - c)
            out[f"history_redraw_{preset}_s"] = round(min(walls), 3)
            out[f"history_redraw_{preset}_cpu_s"] = round(min(cpus), 3)
            shares.append(sum(cpus) / max(1e-9, sum(walls)))  # one thread: CPU seconds per wall second
    out["cpu_share"] = round(min(shares), 3)
    return out
