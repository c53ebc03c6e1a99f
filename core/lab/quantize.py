"""Quantized models for generation, and the side-by-side measurement of fp32, int8 and 4-bit.

- `int8_model(model)`: weight-only int8. Every Linear layer (the output head too) keeps its weights
  as int8 with one scale per row (`core.gpt.quantize.quantize_int8_rows`) and multiplies with
  PyTorch's int8-weight kernel (`torch._weight_int8pack_mm`): activations stay fp32, a decoding
  step reads a quarter of the bytes.
- `int8_model(model, "dynamic")`: PyTorch's dynamic quantization
  (`torch.ao.quantization.quantize_dynamic`, fbgemm on x86, one scale per row): the activations
  are quantized to 8 bits too, one scale per matrix multiply. Faster on a whole prompt, but a
  channel of large activations (SmolLM2's feed-forward has them) costs it accuracy: measured in
  docs/modern-weights.md.
- `int8_model(model, "smooth", calibration)`: SmoothQuant, then the same dynamic int8: each Linear's
  hard input channels are divided down (folded into the norm, or SwiGLU's `up` half, before it)
  and its weight columns multiplied up, with scales measured on a calibration text
  (`core.gpt.quantize.smoothing_scales`). The same function in fp32. In int8, tokens of similar
  size share an activation scale (`TokenGroupedInt8`): SmolLM2 loses 0.027 nats a token, against
  0.905 for plain dynamic int8 (docs/modern-weights.md).
- `q4_1_model(model)`: every Linear weight replaced by what Q4_1 storage would give back
  (`core.gpt.quantize.q4_1_round_trip`): the 4-bit model's numbers, computed in fp32.
- `compare_precisions(run_id, text)`: per-token loss and tokens/s of the three, for the same text.

The textbook side (what a Q4_1 block holds, how int8 rounding works) is `core/gpt/quantize.py`.
"""

from __future__ import annotations

import copy
import functools
import math
import re
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.gpt import quantize as Q
from core.gpt.model import GPT, SwiGLU
from core.lab import fast_decode, gguf
from core.lab.models import generation_threads, load_model_run

PRECISIONS = ("fp32", "int8", "int8-dynamic", "int8-smooth", "q4_1")
# What the page compares by default: this CPU's int8-weight kernel (weight-only) is slower than fp32
# and takes minutes on a 135M model's whole text (docs/modern-weights.md), so it is asked for explicitly.
PAGE_PRECISIONS = ("fp32", "int8-dynamic", "int8-smooth", "q4_1")
# The fixed paragraph docs/modern-weights.md measures per-token loss on (107 SmolLM2 tokens).
PARAGRAPH = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
             "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
             "quickly and cheaply. Before then, most books in Europe were copied by hand, a slow process that kept "
             "them rare and expensive. Within fifty years, presses were operating in more than two hundred cities, "
             "and millions of volumes had been printed. The new technology spread ideas faster than ever before, "
             "helping to fuel the Renaissance, the Reformation and the scientific revolution.")
# What smoothing measures the activations on: other text than PARAGRAPH (which the loss is measured
# on), prose, a chat turn and code, so that no channel meets its first large value at test time.
CALIBRATION = ("Rivers carve valleys over thousands of years: water carries sand and stones downhill, and each "
               "flood scrapes the bed a little deeper. Where the rock is soft the valley widens; where it is hard "
               "the river cuts a narrow gorge and falls in rapids.\n"
               "<|im_start|>user\nCan you give me three tips for learning a new language?<|im_end|>\n"
               "<|im_start|>assistant\n1. Practise a little every day. 2. Speak from the first week, mistakes "
               "and all. 3. Read and listen to things you enjoy.<|im_end|>\n"
               "def mean(values):\n    return sum(values) / len(values) if values else 0.0\n")


def _engine() -> None:
    engines = torch.backends.quantized.supported_engines
    for name in ("fbgemm", "x86", "qnnpack"):
        if name in engines:
            torch.backends.quantized.engine = name
            return


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (one fp32 scale per output row) and fp32 activations."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = Q.quantize_int8_rows(linear.weight.detach().float())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", q.contiguous())  # (out, in) int8
        self.register_buffer("scales", scale.flatten().contiguous())  # (out,)
        bias = linear.bias.detach().float().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:  # what the teaching path and inspections read: fp32 again
        return Q.dequantize_int8_rows(self.weight_int8, self.scales.unsqueeze(1))

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).contiguous()
        y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)  # x @ (q * scale).T, no fp32 copy
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


@torch.inference_mode()
def activation_maxima(model: GPT, ids: list[int]) -> dict[str, torch.Tensor]:
    """max |x_j| of every input channel j of every Linear layer, over the tokens `ids`."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0)  # (in,)
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        model(torch.tensor([ids[: model.config.context_length]]))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def _fold_into_norm(norm: nn.Module, linear: nn.Linear, activation_max: torch.Tensor, alpha: float) -> None:
    """Divide the norm's output channels by s and multiply the Linear's columns by s: same output."""
    s = Q.smoothing_scales(activation_max, linear.weight, alpha)  # (in,)
    norm.weight.div_(s)
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s)
    linear.weight.mul_(s)  # (out, in) * (in,): column j times s_j


@torch.no_grad()
def smooth_model(model: GPT, calibration: list[int], alpha: float = 0.5) -> GPT:
    """A copy of `model` with SmoothQuant's scales folded in: the same function in fp32, with the
    activations of every smoothed Linear evened out across channels. Smoothed: the attention input
    projections (from ln_1), the feed-forward input (from ln_2), SwiGLU's output projection (from
    its `up` half) and the output head (from the final norm; a tied head is untied in the copy)."""
    out = copy.deepcopy(model).eval()
    if out.lm_head.weight is out.wte.weight:  # the head gets its own scaled columns; the table stays
        out.lm_head.weight = nn.Parameter(out.wte.weight.detach().clone())
    maxima = activation_maxima(out, calibration)
    for i, block in enumerate(out.blocks):
        _fold_into_norm(block.ln_1, block.attn.qkv, maxima[f"blocks.{i}.attn.qkv"], alpha)
        _fold_into_norm(block.ln_2, block.mlp.fc, maxima[f"blocks.{i}.mlp.fc"], alpha)
        if isinstance(block.mlp, SwiGLU):  # proj reads silu(gate) * up: scale `up` (fc's second half)
            s = Q.smoothing_scales(maxima[f"blocks.{i}.mlp.proj"], block.mlp.proj.weight, alpha)
            hidden = block.mlp.proj.in_features
            block.mlp.fc.weight[hidden:].div_(s.unsqueeze(1))
            if block.mlp.fc.bias is not None:
                block.mlp.fc.bias[hidden:].div_(s)
            block.mlp.proj.weight.mul_(s)
    _fold_into_norm(out.ln_f, out.lm_head, maxima["lm_head"], alpha)
    return out


class TokenGroupedInt8(nn.Module):
    """A dynamically quantized Linear (fbgemm) that gives each group of similar tokens its own
    activation scale. `quantize_dynamic` takes one scale over all the rows it is given, so in a
    prompt one token with huge activations (Llama-family models put them on the first) leaves the
    others a handful of levels. Rows whose largest |x| lie within a factor `GROUP_FACTOR` of each
    other share one call; a decoding step (one row) is one call, as before."""

    GROUP_FACTOR = 4.0

    def __init__(self, quantized: nn.Module, reduce_range: bool = True):
        super().__init__()
        self.quantized, self.reduce_range = quantized, reduce_range
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.packed = quantized._packed_params._packed_params

    def product(self, x):
        """fbgemm's int8 product of rows x (N, in): x quantized on the fly (7 or 8 bits), then W·x."""
        return torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)

    def forward(self, x):
        if x.numel() == self.in_features:  # a decoding step: one row, one call (no regrouping to do)
            return self.product(x)
        flat = x.reshape(-1, self.in_features)  # (N, in)
        peak = flat.abs().amax(dim=1).clamp(min=1e-12)  # (N,) each token's largest |activation|
        group = torch.floor(torch.log(peak) / math.log(self.GROUP_FACTOR))  # tokens of similar size
        out = flat.new_empty(flat.shape[0], self.out_features)
        for g in group.unique():
            rows = (group == g).nonzero().squeeze(1)
            out[rows] = self.product(flat[rows])
        return out.reshape(*x.shape[:-1], self.out_features)


@functools.cache
def full_range_activations() -> bool:
    """Whether this CPU's int8 dot products have VNNI (avx512_vnni or avx_vnni). Without it fbgemm
    sums pairs of products in 16 bits, which 8-bit activations can overflow, so PyTorch quantizes
    them to 7 bits (`reduce_range`). With VNNI the sums are 32 bits and the eighth bit is free:
    SmolLM2's int8-smooth loss change falls from +0.063 to +0.042 nats (docs/modern-weights.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: keep PyTorch's safe default
        return False
    return re.search(r"\b(avx512_vnni|avx_vnni)\b", flags) is not None


def _group_tokens(model: nn.Module) -> nn.Module:
    """Wrap every dynamically quantized Linear of `model` in TokenGroupedInt8 (in place)."""
    reduce_range = not full_range_activations()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.ao.nn.quantized.dynamic.Linear):
                setattr(module, name, TokenGroupedInt8(child, reduce_range))
    return model


def _drop_inert_dropout(model: nn.Module) -> nn.Module:
    """Replace every Dropout of probability 0 by Identity (in place). A quantized copy only ever
    generates, where such a module is a no-op that still costs a module call: 61 a token in SmolLM2."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout) and child.p == 0:
                setattr(module, name, nn.Identity())
    return model


def _quantize_dynamic(model: GPT) -> GPT:
    """PyTorch's dynamic int8 (fbgemm) on every Linear of `model`, in place."""
    _engine()
    with warnings.catch_warnings():  # PyTorch points to torchao for new code; these kernels are what we measure
        warnings.simplefilter("ignore", DeprecationWarning)
        # One scale per output row: with one scale for a whole matrix, the output head's few
        # large rows crush the others to a handful of levels (SmolLM2: +1.5 nats a token).
        spec = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        return torch.ao.quantization.quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=True).eval()


def int8_model(model: GPT, mode: str = "weight-only", calibration: list[int] | None = None) -> GPT:
    """A copy of `model` whose Linear layers compute with int8 weights (the original is untouched).
    mode "weight-only" (activations fp32), "dynamic" (PyTorch's quantize_dynamic) or "smooth"
    (SmoothQuant on the `calibration` token ids, then quantize_dynamic)."""
    if mode == "smooth":
        if not calibration:
            raise ValueError("int8 mode 'smooth' needs calibration token ids")
        # smooth_model made the copy
        return _drop_inert_dropout(_group_tokens(_quantize_dynamic(smooth_model(model, calibration))))
    if mode == "dynamic":
        return _drop_inert_dropout(_quantize_dynamic(copy.deepcopy(model)))
    if mode != "weight-only":
        raise ValueError(f"int8 mode must be 'weight-only', 'dynamic' or 'smooth', not {mode!r}")
    out = copy.deepcopy(model).eval()
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child))
    return out


def q4_1_model(model: GPT) -> GPT:
    """A copy of `model` whose block matrices went through Q4_1 storage (rows of 32-weight blocks),
    as a Q4_1 GGUF stores them. The token table, and the output head when it is that same table,
    stay as they were (llama.cpp's Q4_1 files keep them at 8 bits: SmolLM2's is Q8_0); a matrix whose
    rows are not a multiple of 32 long stays fp32."""
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, module in out.named_modules():
            if (isinstance(module, nn.Linear) and name.startswith("blocks.")
                    and module.weight.shape[1] % Q.Q4_1_BLOCK == 0):
                module.weight.copy_(Q.q4_1_round_trip(module.weight))
    return out


def weight_bytes(model: nn.Module, precision: str) -> int:
    """Bytes the Linear weights take in `precision` (what a decoding step reads)."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return int(n * Q.BITS_PER_WEIGHT[precision] / 8)


@torch.inference_mode()
def per_token_losses(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Cross-entropy (nats) of each next token of `ids` given the ones before it: (len(ids) - 1,)."""
    x = torch.tensor([ids[:-1]])
    logits, _ = model(x)
    return F.cross_entropy(logits[0].float(), torch.tensor(ids[1:]), reduction="none")


@torch.inference_mode()
def decode_speed(model: GPT, prompt: list[int], new_tokens: int = 32, fast: bool = True) -> dict:
    """Greedy generation with the KV cache: tokens/s of the new tokens (prefill timed apart).
    `fast`: each step through the decoding twin (`core.lab.fast_decode`, the same tokens) rather
    than the textbook's modules."""
    idx = torch.tensor([prompt])
    run = fast_decode.generate if fast else (lambda m, x, n, **kw: m.generate(x, n, **kw))
    with generation_threads(model):
        start = time.perf_counter()
        run(model, idx, 1, temperature=0)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = run(model, idx, new_tokens + 1, temperature=0)
        total = time.perf_counter() - start
    decoding = max(total - prefill, 1e-9)
    return {"tokens_per_s": new_tokens / decoding, "prefill_s": prefill, "tokens": out[0, len(prompt):].tolist()}


@torch.inference_mode()
def forward_seconds(model: GPT, n_tokens: int = 256, repeats: int = 3) -> float:
    """Best time of a forward pass over `n_tokens` tokens (batch 1)."""
    x = torch.randint(model.config.vocab_size, (1, min(n_tokens, model.config.context_length)),
                      generator=torch.Generator().manual_seed(0))
    model(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - start)
    return best


def compare_models(model: GPT, ids: list[int], new_tokens: int = 32, precisions=PRECISIONS,
                   calibration: list[int] | None = None) -> list[dict]:
    """The same text through `model` in each precision: per-token loss and decoding speed.
    `calibration`: the token ids int8-smooth measures its activations on (default: `ids` themselves)."""
    build = {"fp32": lambda m: m.eval(), "int8": int8_model, "int8-dynamic": lambda m: int8_model(m, "dynamic"),
             "int8-smooth": lambda m: int8_model(m, "smooth", calibration or ids), "q4_1": q4_1_model}
    rows, reference = [], None
    for precision in precisions:
        variant = build[precision](model)
        losses = per_token_losses(variant, ids)
        speed = decode_speed(variant, ids[: min(len(ids), 16)], new_tokens)
        if reference is None:
            reference = losses
        rows.append({"precision": precision, "mean_loss": losses.mean().item(),
                     "loss_change": (losses - reference).mean().item(), "per_token_loss": losses.tolist(),
                     "tokens_per_s": speed["tokens_per_s"], "greedy_tokens": speed["tokens"],
                     "weight_bytes": weight_bytes(model, precision), "bits_per_weight": Q.BITS_PER_WEIGHT[precision]})
        del variant
    return rows


def compare_precisions(run_id: str, text: str, new_tokens: int = 32, precisions=PAGE_PRECISIONS) -> list[dict]:
    """fp32, int8 and Q4_1 of run `run_id` on `text` (see `compare_models`)."""
    model, tokenizer, _ = load_model_run(run_id)
    ids = tokenizer.encode(text)[: model.config.context_length]
    if len(ids) < 2:
        raise gguf.GGUFError("The text is too short: it needs at least two tokens to score the second.")
    return compare_models(model, ids, new_tokens, precisions, calibration=tokenizer.encode(CALIBRATION))


def q4_1_lesson(path, tensor: str = "blk.0.attn_q.weight") -> dict:
    """The first Q4_1 block of `tensor` in a GGUF file, taken apart by the textbook function, and
    checked against the gguf package's own dequantization of the same bytes."""
    from gguf.quants import dequantize  # optional dependency, only needed for GGUF files
    from gguf import GGMLQuantizationType  # optional dependency, only needed for GGUF files

    block = gguf.q4_1_blocks(path, tensor, 1)[0]
    weights = Q.dequantize_q4_1_block(block)
    reference = torch.from_numpy(dequantize(block.numpy().reshape(1, -1), GGMLQuantizationType.Q4_1).reshape(-1))
    packed = block[4:20]
    return {"tensor": tensor, "bytes": block.tolist(),
            "scale": block[0:2].view(torch.float16).item(), "minimum": block[2:4].view(torch.float16).item(),
            "integers": torch.cat([packed & 0x0F, packed >> 4]).tolist(), "weights": weights.tolist(),
            "max_difference_from_gguf": (weights - reference).abs().max().item()}
