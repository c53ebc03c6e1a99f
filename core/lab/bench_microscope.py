"""How fast the microscope's views answer: one generation step with its three distributions,
per-token loss on 256 tokens and the logit lens on 64, for the `base` preset and for a model of
GPT-2 124M's shape (random weights: the speed does not depend on what the weights learnt).

    python -m core.lab.bench_microscope            # prints one JSON object
    python -m core.lab.bench_microscope --quick    # base preset only

The stages' thread policy applies (models under 20M parameters run on one thread; see
core.lab.models.generation_threads), and `load_average` says how busy the machine was.

Targets (issue 17, 2 CPU cores): base ≤ 0.3 s per step, ≤ 1 s for surprise(256) and lens(64);
124M ≤ 3 s each. Each figure is the median of a few repeats after one warm-up call.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from core.gpt import microscope
from core.gpt.generate import KVCache, next_logits
from core.gpt.model import GPT, preset_config
from core.lab.bench import matmul_gflops
from core.lab.models import generation_threads

BASE_VOCAB = 1000  # our BPE for the `base` preset (stage 4's default size)
TARGETS = {"base": {"step": 0.3, "surprise": 1.0, "lens": 1.0}, "gpt2-124m": {"step": 3.0, "surprise": 3.0, "lens": 3.0}}


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and CPU seconds of `fn()`. On a busy machine the wall time grows with the
    queue for the cores; the CPU time is closer to what the view costs on a quiet one."""
    fn()  # warm-up: first calls allocate and pick kernels
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def _random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def step_seconds(model: GPT, prompt_length: int = 64, top_k: int = 40, top_p: float = 0.9, repeats: int = 5) -> dict:
    """One cached generation step after `prompt_length` tokens (all three distributions, the step's
    record), and the same step recomputing the whole sequence without the cache."""
    ids = _random_ids(prompt_length, model.config.vocab_size)

    def one_step(use_cache: bool):
        cache = KVCache(model.config, 1, "cpu", torch.float32) if use_cache else None
        if cache is not None:
            next_logits(model, torch.tensor([ids[:-1]]), cache)  # the prefix is cached already
        start = time.perf_counter()
        logits, _ = next_logits(model, torch.tensor([ids]), cache)
        raw, tempered, kept = microscope.three_distributions(logits[0], 0.8, top_k, top_p)
        step = microscope.Step(len(ids), microscope.choose_token(kept, 0.8), False, raw, tempered, kept)
        step.top(10), step.rank, step.entropy
        return time.perf_counter() - start

    with generation_threads(model), torch.inference_mode():
        cached = statistics.median(one_step(True) for _ in range(repeats + 1))
        plain = statistics.median(one_step(False) for _ in range(repeats + 1))
    return {"step_s": cached, "step_uncached_s": plain}


def view_seconds(model: GPT, surprise_tokens: int = 256, lens_tokens: int = 64, repeats: int = 3) -> dict:
    """Per-token loss (with top-5 alternatives) on `surprise_tokens`, logit lens on `lens_tokens`."""
    V = model.config.vocab_size
    text = _random_ids(min(surprise_tokens, model.config.context_length), V, 1)
    short = _random_ids(min(lens_tokens, model.config.context_length), V, 2)
    path = _random_ids(32, V, 3)
    views = {
        "surprise": lambda: microscope.surprise(model, text, 5),
        "lens": lambda: microscope.logit_lens(model, short),
        "attention_maps": lambda: model.attention_maps(torch.tensor([short])),
        # what the panel recomputes on a click: 32 steps taken + the current one + 8 previewed
        "panel_rerun": lambda: microscope.generate_steps(model, short[:16], 41, 0.8, 40, 0.9, forced=path),
    }
    figures = {}
    with generation_threads(model):  # the thread policy the stages use
        for name, fn in views.items():
            figures[f"{name}_s"], figures[f"{name}_cpu_s"] = _median_seconds(fn, repeats)
    return figures


def bench_model(preset: str, vocab_size: int | None = None, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    model = GPT(preset_config(preset, vocab_size)).eval()
    figures = {"preset": preset, "parameters": model.num_parameters(), **step_seconds(model, repeats=repeats + 2),
               **view_seconds(model, repeats=repeats)}
    targets = TARGETS.get(preset, {})
    figures["within_targets"] = all(figures[f"{view}_s"] <= limit for view, limit in targets.items())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def bench_microscope(quick: bool = False) -> dict:
    """Latency of each microscope view: `base` (and, unless quick, GPT-2 124M's shape)."""
    result = {"threads": torch.get_num_threads(), "load_average": round(os.getloadavg()[0], 2),
              # the machine's matmul speed right now (~330 GFLOP/s on 2 quiet cores): scales the rest
              "matmul_gflops": round(matmul_gflops(sizes=(1024,), repeats=3)["matmul_gflops"], 1),
              "base": bench_model("base", BASE_VOCAB)}
    if not quick:
        result["gpt2-124m"] = bench_model("gpt2-124m", repeats=1)  # ~1 minute on 2 busy cores
    return result


if __name__ == "__main__":
    print(json.dumps(bench_microscope(quick="--quick" in sys.argv[1:])))
