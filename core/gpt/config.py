"""The model's configuration: its sizes, the GPT-2 / modern options, and the presets.

`GPTConfig` says what to build; `GPT(config)` (core/gpt/model.py) builds it. Every option has a
GPT-2 default, so a config saved before an option existed loads as the model it was.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from core.gpt.errors import ModelConfigError

ATTENTION_PATHS = ("fast", "teaching")
# GELU(x) = x·Φ(x), Φ the normal distribution's CDF. GPT-2 used the GELU paper's tanh approximation
# of Φ; on this CPU PyTorch's exact (erf) kernel is the fast one: measured on a (32, 64, 512) tensor,
# forward + backward 0.75 ms exact vs 2.3 ms tanh (~10% of a training step of the 3 x 128 model
# measured then). Models trained here use "exact"; GPT-2's weights were trained with, and keep, "tanh".
GELU_KINDS = ("exact", "tanh")
CHOICES = {"attention": ATTENTION_PATHS, "gelu": GELU_KINDS, "position": ("learned", "rope"),
           "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu")}
_SIZES = ("vocab_size", "context_length", "n_embd", "n_head", "n_layer")


# ---------------------------------------------------------------------------- configuration


@dataclass
class GPTConfig:
    vocab_size: int
    context_length: int  # how many positions the model reads at once (GPT-2: 1024)
    n_embd: int  # C, the width of every token's vector
    n_head: int  # attention heads per block; each head works on n_embd // n_head numbers
    n_layer: int  # transformer blocks
    dropout: float = 0.0
    qkv_bias: bool = False  # GPT-2 has a bias on Q/K/V; modern models usually drop it
    tie_weights: bool = True  # lm_head shares its matrix with the token embedding (GPT-2 does)
    attention: str = "fast"  # "fast" or "teaching" (see the module docstring)
    gelu: str = "exact"  # "exact" (erf) or "tanh" (GPT-2's approximation); see GELU_KINDS
    position: str = "learned"  # "learned" (GPT-2's wpe table) or "rope" (rotary: no wpe)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (modules keep the names ln_1, ln_2, ln_f)
    mlp: str = "gelu"  # "gelu" (fc -> GELU -> proj) or "swiglu" (fc = [gate; up] -> proj)
    n_kv_head: int | None = None  # key/value heads; None = n_head. Must divide n_head
    ffn_hidden: int | None = None  # the feed-forward's inner width; None = 4 * n_embd
    rope_base: float = 10000.0  # RoPE's slowest "clock": θ_i = rope_base^(-2i/head_size)
    norm_eps: float = 1e-5  # added under the square root of every norm
    bias: bool = True  # biases in attn.proj, mlp.fc, mlp.proj and LayerNorm (False: none, as Llama)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self._check_sizes()
        self._check_choices()
        if self.position == "rope" and self.head_size % 2:
            raise ModelConfigError(
                f"RoPE rotates pairs of numbers, so each head needs an even size; n_embd / n_head = "
                f"{self.n_embd} / {self.n_head} = {self.head_size}. Choose an even head size.")

    def _check_sizes(self) -> None:
        for name in _SIZES + ("n_kv_head", "ffn_hidden"):
            value = getattr(self, name)
            if (value is not None or name in _SIZES) and (isinstance(value, bool) or not isinstance(value, int)):
                raise ModelConfigError(f"{name} must be a whole number, got {value!r}.")
        if self.vocab_size < 1:
            raise ModelConfigError(f"The vocabulary needs at least one token (vocab_size={self.vocab_size}).")
        if self.context_length < 1:
            raise ModelConfigError(f"context_length must be at least 1 (got {self.context_length}).")
        if self.n_layer < 1:
            raise ModelConfigError(f"A GPT needs at least one transformer block (n_layer={self.n_layer}).")
        if self.n_head < 1:
            raise ModelConfigError(f"Attention needs at least one head (n_head={self.n_head}).")
        if self.n_embd < 1:
            raise ModelConfigError(f"n_embd must be at least 1 (got {self.n_embd}).")
        if self.n_embd % self.n_head:
            raise ModelConfigError(
                f"The embedding size ({self.n_embd}) must divide evenly among the {self.n_head} heads: "
                f"each head gets n_embd / n_head numbers. Try n_embd = {self.n_head * max(1, round(self.n_embd / self.n_head))}."
            )
        if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ModelConfigError(
                f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}): each key/value head "
                f"serves the same number of query heads. Try one of "
                f"{[d for d in range(1, self.n_head + 1) if self.n_head % d == 0]}.")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ModelConfigError(f"ffn_hidden must be at least 1 (got {self.ffn_hidden}).")

    def _check_choices(self) -> None:
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ModelConfigError(f"dropout must be between 0 and 1 (got {self.dropout}).")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ModelConfigError(f"{name} must be {' or '.join(map(repr, allowed))} "
                                       f"(got {getattr(self, name)!r}).")
        for name in ("rope_base", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ModelConfigError(f"{name} must be a positive number (got {value!r}).")
        for name in ("qkv_bias", "tie_weights", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"{name} must be true or false (got {getattr(self, name)!r}).")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_size(self) -> int:  # the feed-forward's inner width
        return self.ffn_hidden or 4 * self.n_embd

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """A config saved as JSON. Older runs lack the newer fields: they get GPT-2's behaviour."""
        if not isinstance(d, dict):
            raise ModelConfigError(f"A model config must be a JSON object, got {type(d).__name__}.")
        missing = [n for n in _SIZES if n not in d]
        if missing:
            raise ModelConfigError(f"The model config lacks {', '.join(missing)}.")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values.setdefault("gelu", "tanh")  # runs saved before the choice existed all used GPT-2's tanh GELU
        return cls(**values)


# The recipes. Stage 4 tunes `small` and `base`; `vocab_size` comes from the tokenizer.
PRESETS: dict[str, dict] = {
    # trains in seconds on a laptop CPU: enough to watch a loss fall
    "tiny": dict(context_length=64, n_embd=64, n_head=4, n_layer=2, dropout=0.0),
    # val loss ≤ 1.88 on Tiny Shakespeare characters in about half a minute on 2 CPU cores with the
    # recipe in core/gpt/pretrain.py. Wide and shallow on purpose: a CPU multiplies wide matrices
    # more efficiently (MFU 0.63-0.65 vs 0.53-0.55 for 3 blocks x 128, nanoGPT's shape minus a block),
    # and 2 x 192 learns as much per second (see the recipe's notes)
    "small": dict(context_length=64, n_embd=192, n_head=6, n_layer=2, dropout=0.0),
    # longer context for BPE tokens; the starting point of stages 5 and 6
    "base": dict(context_length=256, n_embd=128, n_head=4, n_layer=4, dropout=0.0),
    # base's shape with a 2024 block: RoPE, RMSNorm, SwiGLU (inner width ≈ 8/3 C, so its three
    # matrices hold what GELU's two 4C ones do), 2 key/value heads for 4 query heads, no biases
    "modern": dict(context_length=256, n_embd=128, n_head=4, n_layer=4, dropout=0.0, position="rope",
                   norm="rmsnorm", mlp="swiglu", n_kv_head=2, ffn_hidden=344, bias=False),
    # OpenAI's GPT-2 shapes (load their weights with core/lab/gpt2.py)
    "gpt2-124m": dict(context_length=1024, n_embd=768, n_head=12, n_layer=12, dropout=0.0,
                      qkv_bias=True, vocab_size=50257, gelu="tanh"),
    "gpt2-355m": dict(context_length=1024, n_embd=1024, n_head=16, n_layer=24, dropout=0.0,
                      qkv_bias=True, vocab_size=50257, gelu="tanh"),
}


def preset_config(name: str, vocab_size: int | None = None, **overrides) -> GPTConfig:
    """The GPTConfig of a preset; `vocab_size` comes from the tokenizer (GPT-2 presets default to 50257)."""
    if name not in PRESETS:
        raise ModelConfigError(f"Unknown preset {name!r}; presets are {', '.join(PRESETS)}.")
    values = dict(PRESETS[name])
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    if "vocab_size" not in values:
        raise ModelConfigError(f"Preset {name!r} needs a vocabulary size (from the tokenizer).")
    values.update(overrides)
    return GPTConfig(**values)
