"""Stage 3, the architecture: a model's parameter budget, its forward trace, and two side by side.

    python -m core inspect --preset small --vocab-size 65
    python -m core inspect --run my-pretrain-run --text "To be, or not"

Prints the trace (every module's output shape, in order) on stderr and, as the last line of
stdout, JSON with `parameters`, `layers`, `shapes` (module -> output shape), the per-component
`breakdown`, fp32 `bytes` for the weights, `flops_per_token` and `kv_cache_bytes_per_token`.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass

import torch

from core.gpt import generate as generation
from core.gpt import sizes
from core.gpt.errors import GlassBoxError, ModelConfigError
from core.gpt.model import GPT, PRESETS, GPTConfig, preset_config
from core.lab import models, runs
from core.lab.cli import option

COMMAND = "inspect"
BIG_MODEL = 20_000_000  # above this many parameters, trace shapes on the meta device (no memory)
BUILD_LIMIT = 30_000_000  # above this, the page shows shapes only (no weights in the app's memory)
PRESET_VOCAB = {"tiny": 65, "small": 65, "base": 1000, "modern": 1000}  # characters, our BPE
LANGUAGE_MODEL_STAGES = models.LANGUAGE_MODEL_STAGES
__all__ = ["GlassBoxError", "ModelConfigError", "PRESETS", "GPTConfig"]  # what the page reads from here


@dataclass
class Settings:
    preset: str | None = option(None, group="source", help="a preset: " + ", ".join(PRESETS))
    run: str | None = option(None, group="source", help="a run that holds a model")
    vocab_size: int | None = option(None, help="vocabulary size for --preset (default: 50257 for GPT-2 "
                                               "presets, else 256)")
    text: str | None = option(None, help="input to trace (--run only: needs the run's tokenizer)")
    tokens: int = option(8, help="length of the traced input when no --text (default 8)")

    def __post_init__(self):
        if not self.preset and not self.run:
            raise GlassBoxError("Say which model to inspect: --preset NAME or --run ID.")
        if self.preset and self.text:
            raise GlassBoxError("--text needs --run (a preset has no tokenizer); use --tokens N instead.")


# ---------------------------------------------------------------------------- sizes


def shape_report(config: GPTConfig) -> dict:
    """Everything stage 3 says about a shape without building it (core/gpt/sizes.py)."""
    parts = sizes.count_parameters(config)
    total = sum(parts.values())
    return {"parameters": total, "breakdown": parts, "bytes": sizes.memory_bytes(total),
            "training_bytes": 4 * sizes.memory_bytes(total),  # weights + grads + AdamW's two averages
            "head_size": config.head_size, "flops_per_token": sizes.flops_per_token(config),
            "kv_cache_bytes_per_token": sizes.kv_cache_bytes_per_token(config)}


def config_of(name: str) -> GPTConfig:
    """The config of a preset (with its usual vocabulary) or of a run holding a language model."""
    if name in PRESETS:
        return preset_config(name, PRESETS[name].get("vocab_size", PRESET_VOCAB.get(name, 1000)))
    run = runs.open_run(name)
    if "model" not in run.config:
        raise GlassBoxError(f"Run {name!r} holds no model to measure.")
    return GPTConfig.from_dict(run.config["model"])


def comparable() -> list[str]:
    """What stage 3 can compare: every preset, then every run holding a language model."""
    return list(PRESETS) + [r.id for r in models.language_model_runs()]


def compare(first: str, second: str) -> list[dict]:
    """Two configurations (preset names or run ids) side by side: one row per figure."""
    reports = {name: shape_report(config_of(name)) for name in (first, second)}
    configs = {name: config_of(name) for name in (first, second)}
    rows = [("parameters", "parameters"), ("FLOPs per token (training)", "flops_per_token"),
            ("KV-cache bytes per token (fp32)", "kv_cache_bytes_per_token"), ("weights (fp32 bytes)", "bytes")]
    table = [{"figure": label, **{name: reports[name][key] for name in (first, second)}} for label, key in rows]
    for field in ("n_layer", "n_embd", "n_head", "n_kv_head", "context_length", "position", "norm", "mlp"):
        table.append({"figure": field, **{name: str(getattr(configs[name], field) or configs[name].n_head)
                                          for name in (first, second)}})
    return table


# ---------------------------------------------------------------------------- a model to trace and sample


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def trace_rows(trace: list[dict]) -> list[dict]:
    """The forward trace as the page's table rows (indented module names, readable sizes)."""
    return [{"module": "\u2003" * r["depth"] + r["module"], "what it is": r["kind"],
             "output shape": " × ".join(str(d) for d in r["output_shape"] or []),
             "parameters": r["parameters"], "fp32 memory": human_bytes(r["bytes_fp32"]),
             "note": r.get("note", "")} for r in trace]


def top_tokens(scores, tokenizer, k: int = 10) -> tuple[list[float], list[tuple[str, int]]]:
    """The k largest scores (logits or probabilities) with (token text, id), largest first."""
    values, order = scores.topk(min(k, scores.numel()))
    return values.tolist(), [(tokenizer.token_text(int(i)), int(i)) for i in order]


class ByteIds:
    """Token ids for a model without a tokenizer: the text's UTF-8 bytes (folded into the vocabulary)."""

    kind = "bytes"
    eot_id = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def token_text(self, token_id: int) -> str:
        return chr(token_id) if 32 <= token_id < 127 else f"#{token_id}"

    def decode(self, ids) -> str:
        return "".join(self.token_text(int(i)) for i in ids)


@functools.lru_cache(maxsize=2)
def _untrained(config_json: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_dict(json.loads(config_json))).eval()


def untrained_model(config: GPTConfig):
    """(model, ByteIds) of a freshly initialised model of this shape (seed 0), cached by shape."""
    return _untrained(json.dumps(config.to_dict(), sort_keys=True)), ByteIds(config.vocab_size)


def run_model(run_id: str):
    """(model, tokenizer) of a run, cached for the page (core.lab.models.cached_model_run)."""
    return models.cached_model_run(run_id)


def inspect_model(config, model=None, ids: list[int] | None = None, n_tokens: int = 8) -> dict:
    """Parameter budget and forward trace of `model` (or of a fresh model built from `config`)."""
    report = shape_report(config)
    if model is None:
        # A big preset is traced on the meta device: shapes without allocating any weights.
        device = "meta" if report["parameters"] > BIG_MODEL else "cpu"
        with torch.device(device):
            model = GPT(config)
    device = next(model.parameters()).device
    if ids is None:
        ids = [i % config.vocab_size for i in range(max(1, min(n_tokens, config.context_length)))]
    if len(ids) > config.context_length:
        raise GlassBoxError(f"The input has {len(ids)} tokens; the model's context holds {config.context_length}.")
    trace = sizes.forward_trace(model, torch.tensor([ids], dtype=torch.long, device=device))
    return {"parameters": report["parameters"], "layers": config.n_layer,
            "shapes": {row["module"]: row["output_shape"] for row in trace},
            "breakdown": report["breakdown"], "bytes": report["bytes"],
            "flops_per_token": report["flops_per_token"],
            "kv_cache_bytes_per_token": report["kv_cache_bytes_per_token"],
            "config": config.to_dict(), "trace": trace}


def trace_text(config: GPTConfig, text: str) -> dict:
    """The page's trace: the text's bytes through an untrained model (or shapes only when too big),
    with the next token's logits (None for a model too big to build)."""
    tokenizer = ByteIds(config.vocab_size)
    ids = tokenizer.encode(text)[-config.context_length:] or [0]
    if shape_report(config)["parameters"] > BUILD_LIMIT:
        return {"ids": ids, "trace": inspect_model(config, ids=ids)["trace"], "logits": None, "tokenizer": tokenizer}
    model, _ = untrained_model(config)
    trace = sizes.forward_trace(model, torch.tensor([ids]))
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return {"ids": ids, "trace": trace, "logits": logits[0, -1], "tokenizer": tokenizer}


def next_token(model, tokenizer, prompt: str, **filters):
    """The distribution the next token is drawn from after `prompt` (after the filters)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise GlassBoxError("The prompt is empty: type a few characters.")
    return model.next_token_distribution(torch.tensor([ids[-model.config.context_length:]]), **filters)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, **filters) -> tuple[str, int]:
    """(continuation, number of new tokens): sampled with a seeded generator, on the thread policy
    of core.lab.models.generation_threads."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise GlassBoxError("The prompt is empty: type a few characters.")
    generator = torch.Generator().manual_seed(int(seed))
    with models.generation_threads(model):
        out = model.generate(torch.tensor([ids]), max_new_tokens, eos_id=getattr(tokenizer, "eot_id", None),
                             generator=generator, **filters)
    new_ids = out[0, len(ids):].tolist()
    return tokenizer.decode(new_ids), len(new_ids)


# ---------------------------------------------------------------------------- the command


def run(settings: Settings, progress=None) -> dict:
    if settings.preset:
        if settings.preset not in PRESETS:
            raise ModelConfigError(f"Unknown preset {settings.preset!r}; presets are {', '.join(PRESETS)}.")
        vocab = settings.vocab_size or PRESETS[settings.preset].get("vocab_size", 256)
        report = inspect_model(preset_config(settings.preset, vocab), n_tokens=settings.tokens)
    else:
        model, tokenizer, _ = models.load_model_run(settings.run)
        ids = tokenizer.encode(settings.text)[-model.config.context_length:] if settings.text else None
        if settings.text is not None and not ids:
            raise GlassBoxError("The text encodes to no tokens: give a few characters.")
        report = inspect_model(model.config, model=model, ids=ids, n_tokens=settings.tokens)
    for row in report.pop("trace"):
        shape = "×".join(str(d) for d in row["output_shape"] or [])
        print(f"{'  ' * row['depth']}{row['module']:<{28 - 2 * row['depth']}} {row['kind']:<20} "
              f"{shape:<16} {row['parameters']:>12,}", file=sys.stderr)
    print(f"{report['parameters']:,} parameters, {report['bytes'] / 2**20:.1f} MiB in fp32", file=sys.stderr)
    return report


CODE = {
    "parameters": (sizes.count_parameters,),
    "trace": (sizes.forward_trace, GPT.forward),
    "sampling": (generation.filtered_probabilities,),
    "generate": (generation.generate, generation.next_logits),
    "compare": (sizes.flops_per_token, sizes.kv_cache_bytes_per_token),
}
