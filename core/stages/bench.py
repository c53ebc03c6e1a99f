"""`python -m core bench`: measure this machine and the engine in one run.

    python -m core bench                 # every figure, under 5 minutes on a 2-core laptop
    python -m core bench --quick         # small sizes: a smoke test that every piece runs
    python -m core bench --full          # also: seconds for `small` to reach val loss 1.88 (minutes)
    python -m core bench --only matmul,small,kv_cache

A table goes to stderr (figure, value, target, ✓/✗); the last line of stdout is one JSON object
with matmul_gflops, mfu_tiny, mfu_small, tokens_per_s_tiny, tokens_per_s_small,
fast_vs_teaching, kv_cache_speedup, bpe_train_s, first_point_s and the device.
Targets are those of this project on a 2-core CPU; on other machines they are only a guide.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch

from core.gpt.errors import GlassBoxError
from core.lab import bench
from core.lab.bench_int8 import int8_decode
from core.lab.bench_microscope import bench_microscope
from core.lab.cli import option
from core.lab.device import configure_threads, describe, pick_device

COMMAND = "bench"

# piece name → the JSON keys it fills (also accepted by --only)
PIECES = {
    "matmul": ("matmul_gflops",),
    "tiny": ("tokens_per_s_tiny", "mfu_tiny"),
    "small": ("tokens_per_s_small", "mfu_small"),
    "fast_vs_teaching": ("fast_vs_teaching",),
    "kv_cache": ("kv_cache_speedup",),
    "bpe": ("bpe_train_s",),
    "first_point": ("first_point_s",),
    "time_to_val_loss": ("time_to_val_loss_s",),
    "history": ("history_redraw_small_s", "history_redraw_base_s"),
    "microscope": ("microscope_step_base_s", "microscope_surprise_base_s", "microscope_lens_base_s",
                   "microscope_step_124m_s", "microscope_surprise_124m_s", "microscope_lens_124m_s"),
    "int8": ("int8_decode_tokens_per_s", "int8_linears_tokens_per_s", "fp32_decode_tokens_per_s"),
}
DEFAULT_PIECES = [p for p in PIECES if p != "time_to_val_loss"]

# figure → (target text, test) for the table; targets are the CPU ones of issue 11
TARGETS = {
    "mfu_small": ("≥ 0.55", lambda v: v >= 0.55),
    "fast_vs_teaching": ("≥ 1.3", lambda v: v >= 1.3),
    "kv_cache_speedup": ("≥ 5", lambda v: v >= 5),
    "bpe_train_s": ("≤ 30 s", lambda v: v <= 30),
    "first_point_s": ("≤ 3 s", lambda v: v <= 3),
    "time_to_val_loss_s": ("≤ 75 s", lambda v: v <= 75),
    "history_redraw_small_s": ("≤ 1 s", lambda v: v <= 1),
    "history_redraw_base_s": ("≤ 1 s", lambda v: v <= 1),
    "microscope_step_base_s": ("≤ 0.3 s", lambda v: v <= 0.3),
    "microscope_surprise_base_s": ("≤ 1 s", lambda v: v <= 1),
    "microscope_lens_base_s": ("≤ 1 s", lambda v: v <= 1),
    "microscope_step_124m_s": ("≤ 3 s", lambda v: v <= 3),
    "microscope_surprise_124m_s": ("≤ 3 s", lambda v: v <= 3),
    "microscope_lens_124m_s": ("≤ 3 s", lambda v: v <= 3),
    "int8_decode_tokens_per_s": ("≥ 60 tok/s", lambda v: v >= 60),  # issue 18, SmolLM2-135M on 2 cores
}
BUSY_SHARE = 0.85  # below this share of CPU time, the machine was busy during the measurement
UNITS = {"matmul_gflops": "GFLOP/s", "tokens_per_s_tiny": "tok/s", "tokens_per_s_small": "tok/s",
         "kv_cache_speedup": "×", "fast_vs_teaching": "×", "bpe_train_s": "s", "first_point_s": "s",
         "time_to_val_loss_s": "s", "history_redraw_small_s": "s", "history_redraw_base_s": "s",
         **{key: "s" for key in PIECES["microscope"]}, **{key: "tok/s" for key in PIECES["int8"]}}


@dataclass
class Settings:
    quick: bool = option(False, help="small sizes and few steps: checks every piece runs (figures are not meaningful)")
    full: bool = option(False, help="also time the small preset to validation loss 1.88 on Tiny Shakespeare (minutes)")
    only: str | None = option(None, help=f"comma-separated pieces: {', '.join(PIECES)} (or their JSON keys)")
    device: str | None = option(None, help="cpu or cuda (default: the best available)")
    threads: int | None = option(None, help="torch threads (default: one per physical core, or GLASSBOX_THREADS)")

    def __post_init__(self):
        if self.threads is not None and self.threads < 1:
            raise GlassBoxError("--threads must be at least 1.")


def _selected(args) -> list[str]:
    if not args.only:
        return DEFAULT_PIECES + (["time_to_val_loss"] if args.full else [])
    by_key = {key: piece for piece, keys in PIECES.items() for key in keys}
    chosen = []
    for name in (n.strip() for n in args.only.split(",")):
        if not name:
            continue
        piece = name if name in PIECES else by_key.get(name)
        if piece is None:
            raise GlassBoxError(f"Unknown bench piece {name!r}; choose from {', '.join(PIECES)}.")
        if piece not in chosen:
            chosen.append(piece)
    return chosen


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _format(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(result: dict) -> str:
    """The figures as a readable table: figure, value, target, ✓ or ✗."""
    rows = [("figure", "value", "target", "")]
    for key in [k for keys in PIECES.values() for k in keys]:
        if key not in result:
            continue
        value = result[key]
        target, ok = TARGETS.get(key, ("", None))
        mark = "" if ok is None or value is None else ("✓" if ok(value) else "✗")
        unit = UNITS.get(key, "") if value is not None else ""
        rows.append((key, f"{_format(value)} {unit}".strip(), target, mark))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: Settings, progress=None) -> dict:
    """Measure the chosen pieces; `args` is the Settings (named as the command line's options)."""
    if args.threads is not None:
        os.environ["GLASSBOX_THREADS"] = str(args.threads)  # every piece, and the job it starts
    device = pick_device(args.device)
    threads = configure_threads()
    pieces = _selected(args)
    quick = args.quick
    if any(p in pieces for p in ("tiny", "small")) and "matmul" not in pieces:
        pieces.insert(0, "matmul")  # MFU needs the peak measured in the same run
    info = describe()
    result: dict = {"device": device.type, "threads": threads, "torch": torch.__version__,
                    "quick": quick}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    details: dict = {}
    _say(f"bench on {device.type} ({info.get('gpu', f'{threads} threads')}), torch {torch.__version__}"
         f"{' — quick mode' if quick else ''}")
    t0 = time.perf_counter()
    # Training measurements: seconds per measurement (quick: a handful of steps on tiny shapes).
    train_kw = dict(warmup=1, min_steps=2, min_seconds=0.0, batch_size=4) if quick else \
        dict(warmup=3, min_steps=8, min_seconds=4.0)
    gpu = device.type == "cuda"

    for piece in pieces:
        started = time.perf_counter()
        _say(f"· {piece} …")
        if piece == "matmul":
            # Quick mode still goes up to 1024: a 512 multiply is far from the peak on a CPU, and
            # MFU against it came out above 1 (2.7 for `small` on this 2-core machine).
            sizes = (1024,) if quick else ((4096, 8192) if gpu else (1024, 2048))
            figures = bench.matmul_gflops(sizes, repeats=3 if quick else 5, device=device)
            result["matmul_gflops"] = figures["matmul_gflops"]
            result["matmul_dtype"] = figures["matmul_dtype"]
        elif piece in ("tiny", "small"):
            figures = bench.training_speed(piece, result.get("matmul_gflops"), device=device, **train_kw)
            result[f"tokens_per_s_{piece}"] = figures["tokens_per_s"]
            result[f"mfu_{piece}"] = figures.get("mfu")
        elif piece == "fast_vs_teaching":
            kw = dict(preset="tiny", rounds=1, steps_per_round=2, warmup=1, batch_size=4) if quick else {}
            figures = bench.fast_vs_teaching(device=device, **kw)
            result["fast_vs_teaching"] = figures["fast_vs_teaching"]
        elif piece == "kv_cache":
            if quick:
                figures = bench.kv_cache_speedup(device=device, preset="tiny", new_tokens=32, rounds=1)
            else:
                # What the cache saves is recomputation, so the figure depends on model size: on
                # the 1M-parameter `base` preset per-token Python overhead dominates (~3.7× here),
                # on GPT-2 124M (what a learner generates with after importing it) compute does
                # (~7.5×). The headline is GPT-2's shape at 256 positions; `base` is kept beside it.
                figures = bench.kv_cache_speedup(device=device, preset="gpt2-124m", context_length=256,
                                                 rounds=1, vocab_size=1000)
                small_model = bench.kv_cache_speedup(device=device)
                result["kv_cache_speedup_base"] = small_model["kv_cache_speedup"]
                figures["base"] = small_model
            result["kv_cache_speedup"] = figures["kv_cache_speedup"]
            result["kv_cache_identical"] = figures["kv_cache_identical"]
        elif piece == "bpe":
            kw = dict(vocab_size=300, max_chars=50_000) if quick else {}
            figures = bench.bpe_train_s(**kw)
            result["bpe_train_s"] = figures["bpe_train_s"]
        elif piece == "first_point":
            figures = bench.first_point_s()
            result["first_point_s"] = figures["first_point_s"]
        elif piece == "history":
            figures = bench.history_redraw_s(rounds=1 if quick else 3)
            result.update({k: v for k, v in figures.items() if not k.endswith("_cpu_s")})
        elif piece == "microscope":
            figures = bench_microscope(quick=quick)
            for name, shape in (("base", "base"), ("gpt2-124m", "124m")):
                for view, key in (("step_s", "step"), ("surprise_s", "surprise"), ("lens_s", "lens")):
                    if name in figures:
                        result[f"microscope_{key}_{shape}_s"] = figures[name][view]
        elif piece == "int8":
            figures = int8_decode(quick=quick)
            result.update({key: figures[key] for key in PIECES["int8"]})
        elif piece == "time_to_val_loss":
            extra = ("--steps", "20", "--eval-every", "10") if quick else ()
            figures = bench.time_to_val_loss(extra_args=extra)
            result["time_to_val_loss_s"] = figures["time_to_val_loss_s"]
        details[piece] = figures
        note = next((v for k, v in figures.items() if k.endswith("_note")), None)
        _say(f"  done in {time.perf_counter() - started:.1f} s" + (f" ({note})" if note else ""))

    shares = [f["cpu_share"] for f in details.values() if f.get("cpu_share") is not None]
    result["cpu_share"] = min(shares) if shares else None
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["details"] = details
    _say("")
    _say(table(result))
    _say(f"({result['seconds']} s; the machine may be shared: run twice and compare)")
    if result["cpu_share"] is not None and result["cpu_share"] < BUSY_SHARE:
        _say(f"warning: this process got only {result['cpu_share']:.0%} of the CPU time its {threads} "
             "thread(s) asked for — other programs are using the cores, so every speed above is low.")
    return result
