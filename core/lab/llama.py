"""Llama-family weights in and out: Hugging Face's `LlamaForCausalLM` layout (`config.json` + `model.safetensors`).

Our GPT with `position="rope"`, `norm="rmsnorm"`, `mlp="swiglu"` and `bias=False` is Llama's block
(SmolLM2, TinyLlama and Llama itself are this architecture at other sizes), so these folders drop in:

    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained("that/folder")

Differences in bookkeeping, none in the maths:
- Llama keeps Q, K and V as three matrices (`q_proj`, `k_proj`, `v_proj`); we keep one, `attn.qkv`,
  whose rows are [q; k; v] (k and v have n_kv_head * head_size rows each: grouped-query attention).
- Llama keeps the SwiGLU's two input matrices apart (`gate_proj`, `up_proj`); our `mlp.fc` stacks
  their rows [gate; up].
- Hugging Face's RoPE is the "rotate_half" convention (pairs i and i + head_size/2), as ours.

Only safetensors and JSON are read: nothing is ever unpickled.
"""

from __future__ import annotations

import torch

from core.gpt.errors import ModelConfigError
from core.gpt.model import GPT, GPTConfig
from core.lab import runs
from core.lab.errors import CorruptRunError
from core.lab.gpt2 import build_model, import_folder, read_hf_folder, write_hf_folder
from core.lab.models import model_tensors

LLAMA_ACTIVATIONS = ("silu", "swish")


class LlamaFormatError(CorruptRunError):
    """A Llama folder is missing a file or a tensor, holds one of the wrong shape, or sets an option
    Glass Box does not compute."""


def has_biases(config: GPTConfig) -> bool:
    """Llama's layout has biases everywhere (attention_bias + mlp_bias) or nowhere; a model with any
    bias exports them all (the ones it lacks as zeros, which compute the same)."""
    return bool(config.bias or config.qkv_bias)


def is_llama_config(config: GPTConfig) -> bool:
    """True when `config` is Llama's block (and so has a Hugging Face Llama layout)."""
    return config.position == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu"


# ---------------------------------------------------------------------------- config


def _rope_base(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "?"
    if scaling not in (None, {}) or kind != "default":
        raise LlamaFormatError(f"config.json stretches RoPE ({scaling or rope}); Glass Box computes plain RoPE only.")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf_llama(hf: dict) -> GPTConfig:
    """Our GPTConfig from a Hugging Face Llama `config.json` (refusing options we do not compute)."""
    if not isinstance(hf, dict):
        raise LlamaFormatError(f"config.json should hold a JSON object, not a {type(hf).__name__}.")
    if hf.get("model_type") != "llama":
        raise LlamaFormatError(f"config.json describes a {hf.get('model_type')!r} model, not Llama.")
    if hf.get("hidden_act", "silu") not in LLAMA_ACTIVATIONS:
        raise LlamaFormatError(f"config.json uses activation {hf.get('hidden_act')!r}; Llama's SwiGLU uses SiLU.")
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise LlamaFormatError("config.json sets pretraining_tp > 1, which Glass Box does not compute.")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise LlamaFormatError("config.json has biases on attention but not the feed-forward (or the reverse); "
                               "Glass Box's `bias` switch sets both.")
    try:
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim")
        if n_head > 0 and n_embd % n_head == 0 and head_dim not in (None, n_embd // n_head):
            raise LlamaFormatError(f"config.json sets head_dim {head_dim}, not hidden_size / num_attention_heads "
                                   f"({n_embd} / {n_head}); Glass Box needs them equal.")
        return GPTConfig(
            vocab_size=int(hf["vocab_size"]), context_length=int(hf.get("max_position_embeddings", 2048)),
            n_embd=n_embd, n_head=n_head, n_layer=int(hf["num_hidden_layers"]),
            n_kv_head=int(hf.get("num_key_value_heads") or n_head), ffn_hidden=int(hf["intermediate_size"]),
            position="rope", norm="rmsnorm", mlp="swiglu", bias=bool(hf.get("attention_bias", False)),
            qkv_bias=bool(hf.get("attention_bias", False)),
            rope_base=_rope_base(hf), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_weights=bool(hf.get("tie_word_embeddings", False)), dropout=0.0,
        )
    except KeyError as e:
        raise LlamaFormatError(f"config.json lacks {e.args[0]!r}.") from None
    except (TypeError, ValueError) as e:
        raise LlamaFormatError(f"config.json has a value that is not a number ({e}).") from None
    except ModelConfigError as e:
        raise LlamaFormatError(f"config.json does not describe a model that can be built: {e}") from None


def config_to_hf_llama(config: GPTConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """A Hugging Face LlamaConfig dict for our config (a Llama block)."""
    special = config.vocab_size - 1
    bias = has_biases(config)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.n_embd // config.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,  # transformers 4 reads this
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},  # transformers 5
        "rope_scaling": None,
        "attention_bias": bias,
        "mlp_bias": bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": special if bos_id is None else bos_id,
        "eos_token_id": special if eos_id is None else eos_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }


# ---------------------------------------------------------------------------- tensors


def _block_sizes(config: GPTConfig) -> tuple[int, int, int]:
    """(rows of q, rows of k = rows of v, ffn hidden)."""
    hs = config.n_embd // config.n_head
    return config.n_head * hs, config.kv_heads * hs, config.hidden_size


def hf_llama_shapes(config: GPTConfig) -> dict[str, tuple]:
    """The shape config.json implies for each tensor of one layer (by the name after `model.layers.N.`)."""
    q, kv, ffn = _block_sizes(config)
    C = config.n_embd
    shapes = {"input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
              "self_attn.q_proj.weight": (q, C), "self_attn.k_proj.weight": (kv, C),
              "self_attn.v_proj.weight": (kv, C), "self_attn.o_proj.weight": (C, q),
              "mlp.gate_proj.weight": (ffn, C), "mlp.up_proj.weight": (ffn, C), "mlp.down_proj.weight": (C, ffn)}
    if has_biases(config):
        shapes.update({name[: -len("weight")] + "bias": (shape[0],) for name, shape in shapes.items()
                       if name.endswith("proj.weight")})
    return shapes


def tensors_from_hf_llama(hf: dict, config: GPTConfig) -> dict:
    """Llama's tensors under our names: q/k/v fused into attn.qkv, gate/up into mlp.fc. A tensor
    missing or of the wrong shape is named before anything is fused."""
    seen = set()
    layer_shapes = hf_llama_shapes(config)
    top_shapes = {"model.embed_tokens.weight": (config.vocab_size, config.n_embd),
                  "model.norm.weight": (config.n_embd,), "lm_head.weight": (config.vocab_size, config.n_embd)}

    def take(name):
        if name not in hf:
            raise LlamaFormatError(f"The Llama weights lack the tensor {name!r}.")
        want = top_shapes.get(name) or layer_shapes[name.split(".", 3)[3]]
        if tuple(hf[name].shape) != want:
            raise LlamaFormatError(
                f"{name} has shape {tuple(hf[name].shape)}, but config.json (hidden {config.n_embd}, "
                f"{config.n_head} heads, {config.kv_heads} key/value heads, feed-forward {config.hidden_size}) "
                f"needs {want}.")
        seen.add(name)
        return hf[name]

    ours = {"wte.weight": take("model.embed_tokens.weight"), "ln_f.weight": take("model.norm.weight")}
    kinds = ("weight", "bias") if has_biases(config) else ("weight",)
    for i in range(config.n_layer):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        ours[o + "ln_1.weight"] = take(p + "input_layernorm.weight")
        ours[o + "ln_2.weight"] = take(p + "post_attention_layernorm.weight")
        for kind in kinds:
            ours[o + f"attn.qkv.{kind}"] = torch.cat([take(p + f"self_attn.{x}_proj.{kind}") for x in "qkv"])
            ours[o + f"attn.proj.{kind}"] = take(p + f"self_attn.o_proj.{kind}")
            ours[o + f"mlp.fc.{kind}"] = torch.cat([take(p + f"mlp.{x}_proj.{kind}") for x in ("gate", "up")])
            ours[o + f"mlp.proj.{kind}"] = take(p + f"mlp.down_proj.{kind}")
    if not config.tie_weights:
        ours["lm_head.weight"] = take("lm_head.weight")
    extra = [n for n in hf if n not in seen and not (config.tie_weights and n == "lm_head.weight")
             and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise LlamaFormatError(f"The Llama weights hold tensors this config does not expect, e.g. {extra[0]!r} "
                               f"(config.json says {config.n_layer} layers).")
    return ours


def tensors_to_hf_llama(model: GPT) -> dict:
    """Our weights under Llama's names (attn.qkv split into q/k/v, mlp.fc into gate/up)."""
    config = model.config
    state = model_tensors(model)
    q, kv, ffn = _block_sizes(config)
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["ln_f.weight"]}
    kinds = ("weight", "bias") if has_biases(config) else ("weight",)

    def get(name):  # a bias this model was built without: zeros of its matrix's height
        return state[name] if name in state else torch.zeros(state[name[: -len("bias")] + "weight"].shape[0])

    for i in range(config.n_layer):
        p, o = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = state[o + "ln_1.weight"]
        out[p + "post_attention_layernorm.weight"] = state[o + "ln_2.weight"]
        for kind in kinds:
            wq, wk, wv = get(o + f"attn.qkv.{kind}").split([q, kv, kv])
            out.update({p + f"self_attn.q_proj.{kind}": wq, p + f"self_attn.k_proj.{kind}": wk,
                        p + f"self_attn.v_proj.{kind}": wv,
                        p + f"self_attn.o_proj.{kind}": get(o + f"attn.proj.{kind}")})
            gate, up = get(o + f"mlp.fc.{kind}").split([ffn, ffn])
            out.update({p + f"mlp.gate_proj.{kind}": gate, p + f"mlp.up_proj.{kind}": up,
                        p + f"mlp.down_proj.{kind}": get(o + f"mlp.proj.{kind}")})
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------- folders


def load_hf_llama(folder) -> GPT:
    """Our GPT with the weights of a Hugging Face Llama folder (`config.json` + `model.safetensors`)."""
    hf_config, path = read_hf_folder(folder, LlamaFormatError)
    config = config_from_hf_llama(hf_config)
    hf_tensors = runs.load_tensors(path)
    if config.tie_weights and "lm_head.weight" in hf_tensors and not torch.equal(
            hf_tensors["lm_head.weight"], hf_tensors.get("model.embed_tokens.weight", hf_tensors["lm_head.weight"])):
        config.tie_weights = False  # a separate output matrix that differs: keep it separate
    return build_model(config, tensors_from_hf_llama(hf_tensors, config), path, LlamaFormatError)


def save_hf_llama(model: GPT, folder, tokenizer=None):
    """Write `model` (a Llama block) as a Hugging Face Llama folder; the tokenizer goes alongside."""
    if not is_llama_config(model.config):
        raise ModelConfigError("Only a model with RoPE, RMSNorm and SwiGLU has a Llama layout.")
    eot = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
    return write_hf_folder(folder, tensors_to_hf_llama(model), config_to_hf_llama(model.config, eot, eot), tokenizer)


def import_llama(folder, run_id: str, progress=None) -> dict:
    """Load a Hugging Face Llama folder into a new run (stage "import")."""
    return import_folder(folder, run_id, load_hf_llama, "llama", progress)
