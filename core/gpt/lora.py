"""LoRA: fine-tune a big model by training two thin matrices beside each frozen weight.

A full fine-tune changes every number of every weight matrix W (out × in). LoRA (Hu et al., 2021)
keeps W frozen and learns a low-rank change instead:

    y = W x + (alpha / r) · B A x          A: (r × in), B: (out × r), r much smaller than in, out

`B` starts at zero, so at step 0 the model is exactly the model you started from. Only A and B
train: for GPT-2 small's Q/K/V matrix (768 → 2304) at rank 8 that is 8 · (768 + 2304) = 24,576
numbers instead of 1,769,472 (1.4%), and AdamW keeps its two moments for those numbers only.

After training, `B A` can be added into W once (`merge_lora`): the model is then an ordinary GPT
again, just as fast, and can be exported; `unmerge_lora` takes the change back out.

Which matrices get an adapter is a choice (`TARGETS`): the attention's Q/K/V projection (`qkv`),
its output projection (`proj`), the feed-forward layers (`mlp`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.gpt.errors import ModelConfigError

# target name -> the ends of the module names it means. Our GPT names first; the Llama-style names
# (`q_proj` ...) let the same choice work on imported modern models.
TARGETS: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.qkv", "q_proj", "k_proj", "v_proj"),
    "proj": ("attn.proj", "o_proj"),
    "mlp": ("mlp.fc", "mlp.proj", "gate_proj", "up_proj", "down_proj"),
}
DEFAULT_TARGETS = ("qkv", "proj", "mlp")


class LoRAError(ModelConfigError):
    """LoRA cannot be applied as asked (rank, alpha, or target matrices)."""


# ---------------------------------------------------------------------------- the layer


class LoRALinear(nn.Linear):
    """W x + (alpha / r) · B A x: a frozen Linear plus a trainable low-rank update B A."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # the very same tensors: nothing is copied
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        # A starts random (as nn.Linear would), B at zero: B A = 0, so step 0 is the base model.
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        self.merged = False   # True while B A sits inside W (see merge / unmerge)
        self.enabled = True   # False: the layer computes W x only (the reference model in DPO)

    def forward(self, x):  # (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        if self.merged or not self.enabled:
            return y
        return y + (x @ self.lora_A.T @ self.lora_B.T) * self.scale  # (.., in)->(.., r)->(.., out)

    def delta(self) -> torch.Tensor:
        """The change LoRA makes to W: (alpha / r) · B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta()
            self.merged = False

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


# ---------------------------------------------------------------------------- choosing matrices


def check_lora_settings(rank, alpha, targets) -> tuple[int, float, tuple[str, ...]]:
    """Refuse a rank, alpha or target list that cannot work; return them cleaned."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoRAError(f"The LoRA rank must be a whole number of at least 1 (got {rank!r}); try 8.")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoRAError(f"LoRA alpha must be a positive number (got {alpha}); a common choice is alpha = rank.")
    targets = tuple(targets or ())
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown:
        raise LoRAError(f"LoRA targets must be some of {', '.join(TARGETS)} (got {', '.join(targets) or 'none'}).")
    return rank, alpha, targets


def find_targets(model: nn.Module, targets=DEFAULT_TARGETS) -> list[str]:
    """Names of the Linear layers that the chosen targets mean in this model."""
    ends = [end for t in targets for end in TARGETS[t]]
    found = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(name == e or name.endswith("." + e) for e in ends)]
    missing = [t for t in targets
               if not any(n == e or n.endswith("." + e) for n in found for e in TARGETS[t])]
    if missing:
        raise LoRAError(
            f"This model has no {' / '.join(missing)} matrices for LoRA (looked for layers named "
            f"{', '.join(e for t in missing for e in TARGETS[t])})."
        )
    return found


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None,
             targets=DEFAULT_TARGETS) -> list[str]:
    """Freeze every weight of `model` and put a LoRALinear around each target; returns their names."""
    rank, alpha, targets = check_lora_settings(rank, alpha, targets)
    if lora_layers(model):
        raise LoRAError("This model already has LoRA adapters.")
    names = find_targets(model, targets)
    for name in names:
        base = model.get_submodule(name)
        if rank > min(base.in_features, base.out_features):
            raise LoRAError(
                f"Rank {rank} is larger than the matrix {name} ({base.out_features} × "
                f"{base.in_features}): a low-rank update needs r ≤ {min(base.in_features, base.out_features)}."
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# ---------------------------------------------------------------------------- merge, export, reference


def merge_lora(model: nn.Module) -> nn.Module:
    """Add every B A into its W: same outputs, no extra work per token (for export and serving)."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every B A back out of its W (training can go on)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Merge, then put plain nn.Linear layers back: an ordinary model with the tuned weights."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@contextmanager
def lora_disabled(model: nn.Module):
    """Inside this block the model computes its frozen base weights only (W x, no B A x).

    DPO needs a frozen reference model: with LoRA it is the same model with the adapters off,
    so no second copy of the weights is needed.
    """
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise LoRAError("Unmerge the LoRA adapters before switching them off.")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


# ---------------------------------------------------------------------------- counting and saving


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone: every lora_A and lora_B, by their full names (a few MB even for 124M)."""
    return {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")}


def load_lora_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "the adapter") -> None:
    """Copy saved adapter tensors into a model that has the same adapters."""
    expected = lora_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise LoRAError(f"{source} does not fit this model's adapters (missing {missing[:3]}, extra {extra[:3]}).")
    with torch.no_grad():
        for name, p in expected.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise LoRAError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(p.shape)}.")
            p.copy_(tensors[name])


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_parameter_count(model: nn.Module, rank: int, targets=DEFAULT_TARGETS) -> int:
    """Trainable numbers LoRA would add to `model`, without changing it: r · (in + out) per matrix."""
    rank, _, targets = check_lora_settings(rank, None, targets)
    return sum(rank * (m.in_features + m.out_features)
               for m in (model.get_submodule(n) for n in find_targets(model, targets)))


def training_memory(trainable: int, bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes a training step keeps per trainable number: its gradient and AdamW's two moments."""
    return {"gradients": trainable * bytes_per_value, "optimiser": 2 * trainable * bytes_per_value}
