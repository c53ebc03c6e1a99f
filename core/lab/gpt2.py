"""GPT-2 weights in and out: the Hugging Face layout (`config.json` + `model.safetensors`).

Our `GPT` is GPT-2's architecture, so OpenAI's released weights drop straight in — and any model
trained here can leave in the same layout and be opened with `transformers`:

    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained("that/folder")

Two differences in bookkeeping, none in the maths:
- GPT-2 stores its Linear layers as `Conv1D`, whose matrix is (in, out) — the transpose of
  `nn.Linear`'s (out, in). We transpose `c_attn`, `c_proj`, `c_fc` on the way in and out.
- GPT-2 always has a bias on Q/K/V (`qkv_bias=True`); a model of ours without one exports zeros.

Only safetensors and JSON are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import torch

from core.gpt.errors import GlassBoxError, ModelConfigError
from core.gpt.model import GPT, GPTConfig
from core.lab import runs
from core.lab.errors import CorruptRunError
from core.lab.models import load_model_run, load_model_weights, model_tensors, save_model_run
from core.lab.paths import downloads_dir
from core.lab.tokenizer_files import gpt2_tokenizer, load_tokenizer, save_tokenizer

HUB_URL = "https://huggingface.co"
HUB_FILES = ("config.json", "model.safetensors")
# The tokenizer of a run, written next to an export so that importing it back needs nothing else.
GLASSBOX_TOKENIZER_FILE = "glassbox_tokenizer.json"
GPT2_VOCAB_SIZE = 50257

# Our name -> GPT-2's name (inside `transformer.`), and whether the matrix is transposed (Conv1D).
_BLOCK_NAMES = {
    "ln_1.weight": ("ln_1.weight", False),
    "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True),
    "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True),
    "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False),
    "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True),
    "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True),
    "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
_TOP_NAMES = {"wte.weight": "wte.weight", "wpe.weight": "wpe.weight",
              "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # Hugging Face's names for GPT-2's tanh GELU
_GELU_EXACT = ("gelu",)  # the erf GELU (what models trained here use)


class GPT2FormatError(CorruptRunError):
    """A GPT-2 folder is missing a file or a tensor, or holds one of the wrong shape."""


# ---------------------------------------------------------------------------- config


def is_gpt2_config(config: GPTConfig) -> bool:
    """True when `config` is GPT-2's block (learned positions, LayerNorm, GELU, every head its own K/V)."""
    return (config.position == "learned" and config.norm == "layernorm" and config.mlp == "gelu"
            and config.kv_heads == config.n_head)


def config_from_hf(hf: dict) -> GPTConfig:
    """Our GPTConfig from a Hugging Face GPT-2 `config.json` (refusing variants we do not compute)."""
    if not isinstance(hf, dict):
        raise GPT2FormatError(f"config.json should hold a JSON object, not a {type(hf).__name__}.")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise GPT2FormatError(f"config.json describes a {hf.get('model_type')!r} model, not GPT-2.")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GELU_TANH + _GELU_EXACT:
        raise GPT2FormatError(f"config.json uses activation {activation!r}; Glass Box computes GELU, exact "
                              "('gelu') or GPT-2's tanh approximation ('gelu_new').")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise GPT2FormatError(f"config.json turns on {flag}, which Glass Box does not compute.")
    try:
        return GPTConfig(
            vocab_size=int(hf.get("vocab_size", GPT2_VOCAB_SIZE)),
            context_length=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_embd=int(hf.get("n_embd", 768)),
            n_head=int(hf.get("n_head", 12)),
            n_layer=int(hf.get("n_layer", 12)),
            dropout=0.0,  # dropout only matters while training; fine-tuning stages set their own
            qkv_bias=True,
            tie_weights=bool(hf.get("tie_word_embeddings", True)),
            gelu="exact" if activation in _GELU_EXACT else "tanh",
            ffn_hidden=int(hf["n_inner"]) if hf.get("n_inner") is not None else None,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except (TypeError, ValueError) as e:
        raise GPT2FormatError(f"config.json has a value that is not a number ({e}).") from None
    except ModelConfigError as e:
        raise GPT2FormatError(f"config.json does not describe a model that can be built: {e}") from None


def config_to_hf(config: GPTConfig, eot_id: int | None = None) -> dict:
    """A Hugging Face GPT2Config dict for our config."""
    special = eot_id if eot_id is not None else config.vocab_size - 1
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.context_length,
        "n_ctx": config.context_length,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.ffn_hidden,
        "activation_function": "gelu" if config.gelu == "exact" else "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": config.tie_weights,
        "bos_token_id": special,
        "eos_token_id": special,
        "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------------- tensors


def _strip_prefix(tensors: dict) -> dict:
    """OpenAI's original files name tensors `h.0…`, `save_pretrained` names them `transformer.h.0…`."""
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        # `attn.bias` / `attn.masked_bias` in old files are the causal mask, not weights: skip them.
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue
        out[name] = tensor
    return out


def tensors_from_hf(hf_tensors: dict, config: GPTConfig) -> dict:
    """Rename (and transpose) GPT-2's tensors into our state dict names."""
    hf = _strip_prefix(hf_tensors)
    ours = {}

    def take(hf_name, transpose=False):
        if hf_name not in hf:
            raise GPT2FormatError(f"The GPT-2 weights lack the tensor {hf_name!r}.")
        t = hf[hf_name]
        return t.t().contiguous() if transpose else t

    for our_name, hf_name in _TOP_NAMES.items():
        ours[our_name] = take(hf_name)
    for i in range(config.n_layer):
        for our_name, (hf_name, transpose) in _BLOCK_NAMES.items():
            ours[f"blocks.{i}.{our_name}"] = take(f"h.{i}.{hf_name}", transpose)
    if not config.tie_weights:
        if "lm_head.weight" not in hf:
            raise GPT2FormatError("The GPT-2 weights are untied but lack the tensor 'lm_head.weight'.")
        ours["lm_head.weight"] = hf["lm_head.weight"]
    extra = [n for n in hf if n != "lm_head.weight" and n not in
             {_hf for _hf in _TOP_NAMES.values()} and not _is_block_tensor(n, config.n_layer)]
    if extra:
        raise GPT2FormatError(
            f"The GPT-2 weights hold tensors this config does not expect, e.g. {extra[0]!r} "
            f"(config.json says {config.n_layer} layers)."
        )
    return ours


def _is_block_tensor(name: str, n_layer: int) -> bool:
    parts = name.split(".", 2)
    return (len(parts) == 3 and parts[0] == "h" and parts[1].isdigit() and int(parts[1]) < n_layer
            and parts[2] in {hf for hf, _ in _BLOCK_NAMES.values()})


def tensors_to_hf(model: GPT) -> dict:
    """Our weights under GPT-2's names (Conv1D matrices transposed), ready for `save_pretrained`'s layout."""
    config = model.config
    state = model_tensors(model)
    out = {}
    for our_name, hf_name in _TOP_NAMES.items():
        out[f"transformer.{hf_name}"] = state[our_name] if our_name in state else torch.zeros(config.n_embd)
    for i in range(config.n_layer):
        for our_name, (hf_name, transpose) in _BLOCK_NAMES.items():
            key = f"blocks.{i}.{our_name}"
            if key not in state:  # a bias the model was built without: GPT-2 has one, of zeros
                tensor = torch.zeros(state[key[: -len("bias")] + "weight"].shape[0])
            else:
                tensor = state[key].t() if transpose else state[key]
            out[f"transformer.h.{i}.{hf_name}"] = tensor.detach().contiguous()
    if "lm_head.weight" in state:  # untied: GPT-2 keeps its own output matrix
        out["lm_head.weight"] = state["lm_head.weight"]
    return out


# ---------------------------------------------------------------------------- folders


def read_hf_folder(folder, error=None) -> tuple[dict, Path]:
    """(config.json as a dict, the path of model.safetensors) of a Hugging Face folder; a missing
    file or bad JSON raises `error` (GPT2FormatError by default). Check the config before reading
    the weights: a wrong config is said without loading hundreds of megabytes."""
    error = error or GPT2FormatError
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise error(f"{folder} is not a folder.")
    for name in HUB_FILES:
        if not (folder / name).is_file():
            hint = " (only safetensors is read: a pytorch_model.bin is never unpickled)" if name.endswith(
                "safetensors") else ""
            raise error(f"{folder} has no {name}{hint}.")
    try:
        hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{folder / 'config.json'} is not valid JSON ({e}).") from None
    if not isinstance(hf_config, dict):
        raise error(f"config.json should hold a JSON object, not a {type(hf_config).__name__}.")
    return hf_config, folder / "model.safetensors"


def folder_model_type(folder) -> str:
    """The `model_type` a Hugging Face folder's config.json names ("gpt2" when it names none)."""
    path = Path(folder).expanduser() / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "gpt2"  # let the GPT-2 reader say precisely what is wrong
    return str(hf.get("model_type", "gpt2")) if isinstance(hf, dict) else "gpt2"


def load_hf_gpt2(folder) -> GPT:
    """Our GPT with the weights of a Hugging Face GPT-2 folder (`config.json` + `model.safetensors`)."""
    hf_config, path = read_hf_folder(folder)
    config = config_from_hf(hf_config)
    hf_tensors = runs.load_tensors(path)
    # A file with lm_head.weight but tied embeddings in config: keep it tied only if it equals wte.
    if config.tie_weights and "lm_head.weight" in hf_tensors:
        wte = _strip_prefix(hf_tensors).get("wte.weight")
        if wte is not None and not torch.equal(wte, hf_tensors["lm_head.weight"]):
            config.tie_weights = False
    return build_model(config, tensors_from_hf(hf_tensors, config), path, GPT2FormatError)


def build_model(config: GPTConfig, tensors: dict, source, error=None) -> GPT:
    """A GPT of `config` holding `tensors` (as fp32); a misfit tensor raises `error`, naming it."""
    model = GPT(config)
    try:
        load_model_weights(model, {k: v.float() for k, v in tensors.items()}, source=str(source))
    except CorruptRunError as e:
        raise (error or GPT2FormatError)(str(e)) from None
    return model.eval()


def write_hf_folder(folder, tensors: dict, hf_config: dict, tokenizer=None) -> Path:
    """Write a Hugging Face folder: model.safetensors, config.json, and our tokenizer alongside."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise GlassBoxError(f"{folder} exists and is not a folder.")
    folder.mkdir(parents=True, exist_ok=True)
    runs.save_tensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    runs.write_json_atomic(folder / "config.json", hf_config)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder / GLASSBOX_TOKENIZER_FILE)
    return folder


def save_hf_gpt2(model: GPT, folder, tokenizer=None) -> Path:
    """Write `model` as a Hugging Face GPT-2 folder; the tokenizer goes alongside as our JSON."""
    if not is_gpt2_config(model.config):
        raise ModelConfigError("Only a model with learned positions, LayerNorm and a GELU feed-forward "
                               "has a GPT-2 layout.")
    eot = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
    return write_hf_folder(folder, tensors_to_hf(model), config_to_hf(model.config, eot), tokenizer)


def tokenizer_for_folder(folder, vocab_size: int):
    """Our tokenizer file if the folder came from Glass Box, else GPT-2's own (50,257 tokens)."""
    own = Path(folder) / GLASSBOX_TOKENIZER_FILE
    if own.is_file():
        return load_tokenizer(own)
    if vocab_size < GPT2_VOCAB_SIZE:
        raise GPT2FormatError(
            f"The model has {vocab_size} tokens, fewer than GPT-2's {GPT2_VOCAB_SIZE}, and the folder has no "
            f"{GLASSBOX_TOKENIZER_FILE}: no tokenizer fits it."
        )
    return gpt2_tokenizer()


def tokenizer_name(tokenizer) -> str:
    """How a run's config names its tokenizer: 'gpt2', 'bpe', 'char', or a byte-level BPE's own name."""
    kind = getattr(tokenizer, "kind", "?")
    return getattr(tokenizer, "name", kind) if kind == "bytelevel" else kind


def save_imported_run(run_id: str, model: GPT, tokenizer, config: dict, progress=None) -> dict:
    """Create run `run_id` (stage "import") holding `model` and `tokenizer`; a failure half-way
    removes the half-made run (an existing run of that name is refused before anything is written)."""
    say = progress or (lambda msg: None)
    with runs.quick_run(run_id, "import", {"tokenizer": tokenizer_name(tokenizer), **config}):
        say(f"saving {model.num_parameters():,} parameters into run {run_id}")
        save_model_run(run_id, model, tokenizer)
    return {"run_id": run_id, "architecture": config.get("architecture", "gpt2"),
            "parameters": model.num_parameters(), "layers": model.config.n_layer,
            "vocab_size": model.config.vocab_size, "context_length": model.config.context_length}


def import_folder(folder, run_id: str, load=None, architecture: str = "gpt2", progress=None) -> dict:
    """Load a Hugging Face folder with `load` (GPT-2's by default) into a new run (stage "import")."""
    folder = Path(folder).expanduser()
    runs.validate_run_id(run_id)
    if progress:
        progress(f"reading {folder}")
    model = (load or load_hf_gpt2)(folder)
    tokenizer = tokenizer_for_folder(folder, model.config.vocab_size)
    return save_imported_run(run_id, model, tokenizer, {"source": str(folder.resolve()),
                                                        "architecture": architecture}, progress)


def import_gpt2(folder, run_id: str, progress=None) -> dict:
    """Load a GPT-2 folder into a new run (stage "import") that every later page can open."""
    return import_folder(folder, run_id, load_hf_gpt2, "gpt2", progress)


def export_run(run_id: str, out_dir) -> Path:
    """Write run `run_id` as a Hugging Face GPT-2 folder."""
    model, tokenizer, _ = load_model_run(run_id)
    return save_hf_gpt2(model, out_dir, tokenizer)


# ---------------------------------------------------------------------------- the hub (optional, online)


def download_gpt2(name: str = "openai-community/gpt2", dest=None, progress=None, base_url: str = HUB_URL,
                  timeout: float = 30.0) -> Path:
    """Download `config.json` and `model.safetensors` of a GPT-2 repo from the Hugging Face hub.

    Explicit and optional: nothing else in Glass Box goes online. `progress(done_bytes, total_bytes,
    filename)` is called as the file streams in; files land atomically in `dest`.
    """
    if not name or any(c in name for c in " \\?#") or ".." in name:
        raise GlassBoxError(f"{name!r} is not a Hugging Face model name like 'openai-community/gpt2'.")
    dest = Path(dest) if dest else downloads_dir() / "gpt2" / name.replace("/", "--")
    dest.mkdir(parents=True, exist_ok=True)
    for filename in HUB_FILES:
        target = dest / filename
        if target.is_file():
            continue
        url = f"{base_url.rstrip('/')}/{name}/resolve/main/{filename}"
        tmp = target.with_suffix(target.suffix + ".tmp")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0)
                done = 0
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total, filename)
            tmp.replace(target)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            tmp.unlink(missing_ok=True)
            raise GlassBoxError(f"Could not download {url} ({e}). Are you online? "
                                "Or download the folder yourself and import it with --from.") from None
    return dest
