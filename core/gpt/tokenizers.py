"""Stage 1: tokenisers turn text into integers and back.

A language model never sees letters, only a list of integer ids. Three ways of making that list
are trained here, all behind one small interface (``Tokenizer``) so that the rest of Glass Box does
not care which one a run used:

- ``char``: one id per character seen in the corpus (tiny vocabulary, long sequences).
- ``word``: one id per word-like piece seen in the corpus; anything else becomes ``<|unk|>``.
- ``bpe``:  byte-level byte-pair encoding: start from the 256 byte values and repeatedly glue
  together the most frequent neighbouring pair. Any UTF-8 text round-trips. ``train_bpe_naive``
  is the whole algorithm in 15 lines; ``train_bpe`` learns the same merges, fast.

GPT-2's own tokeniser (and SmolLM2's) is the same byte-level BPE with someone else's merges, run by
tiktoken: it lives with the machinery, in ``core/lab/tokenizer_files.py``, which also saves and loads
every tokeniser as JSON.

Every tokeniser knows ``<|endoftext|>`` (``eot_id``), the marker placed between documents.
Interface: ``.kind``, ``.encode(text)``, ``.decode(ids)``, ``.vocab_size``, ``.eot_id``,
``.token_text(id)``, ``.special_ids()``, ``.to_dict()``; ``tokenizer_from_dict(d)``.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from typing import Callable, Iterable

import regex

from core.gpt.errors import TokenizerError

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
DEFAULT_BPE_VOCAB = 1000
DEFAULT_WORD_VOCAB = 5000

Progress = Callable[[int, int], None]  # progress(done, total)


# ---- Input checks shared by every tokeniser


def _check_corpus(text) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"A tokeniser learns from text, but it was given {type(text).__name__}. "
                             "Decode the file as UTF-8 text first.")
    if not text.strip():
        raise TokenizerError("The corpus is empty: there is no text to learn a vocabulary from.")
    return check_utf8(text)


def check_text(text) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"Only text can be encoded, not {type(text).__name__}.")
    return text


def check_utf8(text: str) -> str:
    """Byte-level tokenisers need text that has a UTF-8 form (no lone surrogate halves)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(f"The text has an invalid character at position {exc.start} (a lone "
                             "surrogate), which has no UTF-8 bytes.") from None
    return text


def _check_vocab_size(vocab_size, minimum: int, what: str) -> int:
    whole = isinstance(vocab_size, int) or (isinstance(vocab_size, float) and math.isfinite(vocab_size)
                                            and vocab_size == int(vocab_size))
    if isinstance(vocab_size, bool) or not whole:
        raise TokenizerError(f"The vocabulary size must be a whole number, not {vocab_size!r}.")
    vocab_size = int(vocab_size)
    if vocab_size < minimum:
        why = " (one per byte value, plus <|endoftext|>)" if what == "byte-level BPE" else ""
        raise TokenizerError(f"A {what} vocabulary needs at least {minimum} tokens{why}; {vocab_size} is too small.")
    if vocab_size > MAX_VOCAB:
        raise TokenizerError(f"A vocabulary of {vocab_size:,} tokens is too large (at most {MAX_VOCAB:,}).")
    return vocab_size


def _split_on_special(text: str) -> list[str]:
    """Cut text around literal '<|endoftext|>' markers, keeping the markers as separate parts."""
    return [part for part in _SPECIAL_SPLIT.split(text) if part]


def count_pieces(text: str) -> Counter:
    """The pre-split pieces of ``text`` with their counts; '<|endoftext|>' markers are skipped."""
    pieces = Counter()
    for part in _split_on_special(text):
        if part != ENDOFTEXT:
            pieces.update(_GPT2_SPLIT.findall(part))
    return pieces


def readable_bytes(data: bytes) -> str:
    """Show a token's bytes as text; bytes that are not whole UTF-8 characters show as \\xNN."""
    return data.decode("utf-8", errors="backslashreplace")


def visible(token: str) -> str:
    """Make spaces, tabs and line breaks visible in a token label ('' shows as ∅)."""
    return token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥") or "∅"


# ---- The interface


class Tokenizer:
    """Text ⇄ ids. Subclasses fill in ``encode``, ``decode``, ``token_text`` and ``to_dict``."""

    kind: str = "?"
    vocab_size: int = 0
    eot_id: int | None = None

    def encode(self, text: str) -> list[int]: raise NotImplementedError  # noqa: E704
    def decode(self, ids: Iterable[int]) -> str: raise NotImplementedError  # noqa: E704
    def token_text(self, token_id: int) -> str: raise NotImplementedError  # noqa: E704
    def to_dict(self) -> dict: raise NotImplementedError  # noqa: E704

    def special_ids(self) -> set[int]:
        """Ids that are markers, not text (shown highlighted in a chat prompt)."""
        return {self.eot_id} if self.eot_id is not None else set()

    def _check_ids(self, ids) -> list[int]:
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            raise TokenizerError("Token ids must be whole numbers.") from None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"Token id {i} is not in this {self.kind} vocabulary of {self.vocab_size:,} ids.")
        return ids

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} vocab_size={self.vocab_size}>"


# ---- Characters and words: a lookup table from pieces of text to ids


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
        for part in _split_on_special(check_text(text)):
            if part == ENDOFTEXT:
                ids.append(self.eot_id)
            else:
                ids.extend(self.stoi.get(p, self.unk_id) for p in self._pieces(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in self._check_ids(ids))

    def token_text(self, token_id: int) -> str:
        return self.itos[self._check_ids([token_id])[0]]

    def special_ids(self) -> set[int]:
        return {self.eot_id, self.unk_id}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "version": FORMAT_VERSION, "vocab": self.itos}


class CharTokenizer(_TableTokenizer):
    """One id per character (Unicode code point) seen in the training text."""

    kind = "char"

    def _pieces(self, text: str) -> list[str]:
        return list(text)


class WordTokenizer(_TableTokenizer):
    """One id per word-like piece, cut with GPT-2's pattern (so ' the' keeps its leading space).
    Keeping the space inside the piece makes decoding a simple join: known text comes back exactly."""

    kind = "word"

    def _pieces(self, text: str) -> list[str]:
        return _GPT2_SPLIT.findall(text)


def train_char(text: str) -> CharTokenizer:
    """The vocabulary is the sorted set of characters in the corpus."""
    return CharTokenizer(sorted({c for part in _split_on_special(_check_corpus(text))
                                 if part != ENDOFTEXT for c in part}))


def train_word(text: str, max_vocab: int = DEFAULT_WORD_VOCAB) -> WordTokenizer:
    """Keep the ``max_vocab`` - 2 most frequent pieces (ties broken alphabetically)."""
    counts = count_pieces(_check_corpus(text))
    max_vocab = _check_vocab_size(max_vocab, len(_TableTokenizer.specials) + 1, "word")
    keep = max_vocab - len(_TableTokenizer.specials)
    most_common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]
    return WordTokenizer([piece for piece, _ in most_common])


# ---- Byte-level BPE


class BPETokenizer(Tokenizer):
    """Byte-level BPE: ids 0-255 are the raw bytes; id 256 + i is the i-th merge; the last id is
    ``<|endoftext|>``. Encoding splits text with the GPT-2 pattern, turns each piece into bytes
    and applies the learnt merges, earliest-learnt first, until none applies."""

    kind = "bpe"

    def __init__(self, merges: list[tuple[int, int]], pattern: str = GPT2_SPLIT_PATTERN):
        self.pattern = pattern
        self._split = regex.compile(pattern)
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.ranks: dict[tuple[int, int], int] = {}  # pair -> id of the merged token (lower = earlier)
        self.token_bytes: list[bytes] = [bytes([b]) for b in range(256)]
        for pair in self.merges:
            if not all(0 <= t < len(self.token_bytes) for t in pair):
                raise TokenizerError(f"The merge {pair} uses a token that does not exist yet.")
            if pair in self.ranks:
                raise TokenizerError(f"The merge {pair} is listed twice.")
            self.ranks[pair] = len(self.token_bytes)
            self.token_bytes.append(self.token_bytes[pair[0]] + self.token_bytes[pair[1]])
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
        for part in _split_on_special(check_utf8(check_text(text))):
            if part == ENDOFTEXT:
                ids.append(self.eot_id)
                continue
            for piece in self._split.findall(part):
                ids.extend(self._encode_piece(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        data = b"".join(ENDOFTEXT.encode() if i == self.eot_id else self.token_bytes[i]
                        for i in self._check_ids(ids))
        return data.decode("utf-8", errors="replace")  # half a character (one id of an emoji) shows as '�'

    def token_text(self, token_id: int) -> str:
        (token_id,) = self._check_ids([token_id])
        return ENDOFTEXT if token_id == self.eot_id else readable_bytes(self.token_bytes[token_id])

    def truncated(self, vocab_size: int) -> "BPETokenizer":
        """The same tokeniser as it was when training had reached ``vocab_size``."""
        vocab_size = _check_vocab_size(vocab_size, MIN_BPE_VOCAB, "byte-level BPE")
        return BPETokenizer(self.merges[: vocab_size - MIN_BPE_VOCAB], self.pattern)

    def mergeable_ranks(self) -> dict[bytes, int]:
        """bytes -> id: the table tiktoken builds an encoding from (core/lab/tokenizer_files.py)."""
        return {data: i for i, data in enumerate(self.token_bytes)}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "version": FORMAT_VERSION, "pattern": self.pattern,
                "special_tokens": {ENDOFTEXT: self.eot_id}, "merges": [list(pair) for pair in self.merges]}


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every (left to right, non-overlapping) occurrence of ``pair`` in ``ids`` by ``new_id``."""
    out, i = [], 0
    while i < len(ids):
        if i < len(ids) - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe_naive(text: str, vocab_size: int) -> BPETokenizer:
    """BPE in full: count every neighbouring pair, merge the most frequent, repeat. (Slow: it
    recounts the whole corpus after each merge. ``train_bpe`` learns the same merges, fast.)"""
    words = {tuple(p.encode("utf-8")): n for p, n in count_pieces(_check_corpus(text)).items()}
    token_bytes = [bytes([b]) for b in range(256)]
    n_merges, merges, banned = _check_vocab_size(vocab_size, MIN_BPE_VOCAB, "byte-level BPE") - 257, [], set()
    while len(merges) < n_merges:
        counts = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += n if pair not in banned else 0
        pair = min((p for p in counts if counts[p]), key=lambda p: (-counts[p], p), default=None)
        if pair is None:
            break  # nothing left to merge
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in token_bytes:  # those bytes are a token already: never the same string twice
            banned.add(pair)
            continue
        merges.append(pair)
        token_bytes.append(merged)
        words = {tuple(merge_pair(list(w), pair, len(token_bytes) - 1)): n for w, n in words.items()}
    return BPETokenizer(merges)


def _pair_counts_of(word: list[int]) -> Counter:
    return Counter(zip(word, word[1:]))


def _merge_everywhere(words, counts, where, pair, new_id) -> Counter:
    """Merge ``pair`` in the pieces that contain it; return how each pair's count changed."""
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
    return delta


def train_bpe(text: str, vocab_size: int, progress: Progress | None = None) -> BPETokenizer:
    """The same merges as ``train_bpe_naive``, fast. The corpus is reduced to its *unique* pieces
    with their counts (Tiny Shakespeare: ~300k pieces, ~25k unique); every pair is counted once,
    and after a merge only the pieces that contained the pair are updated. A heap (by -count,
    then pair) gives the most frequent pair; an entry whose count has changed is skipped."""
    pieces = count_pieces(_check_corpus(text))
    n_merges = _check_vocab_size(vocab_size, MIN_BPE_VOCAB, "byte-level BPE") - MIN_BPE_VOCAB
    words = [list(piece.encode("utf-8")) for piece in pieces]
    counts = list(pieces.values())
    pair_counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = {}  # pair -> the pieces that contain it
    for w, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += counts[w]
            where.setdefault(pair, set()).add(w)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    merges, token_bytes = [], [bytes([b]) for b in range(256)]
    known, report_every = set(token_bytes), max(1, n_merges // 100)
    while len(merges) < n_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale: this pair's count has changed since it was pushed
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in known:  # those bytes are a token already: drop the pair
            del pair_counts[pair]
            continue
        merges.append(pair)
        token_bytes.append(merged)
        known.add(merged)
        delta = _merge_everywhere(words, counts, where, pair, len(token_bytes) - 1)
        pair_counts.pop(pair, None)
        delta.pop(pair, None)
        for p, d in delta.items():
            if d and pair_counts.get(p, 0) + d > 0:
                pair_counts[p] += d
                heapq.heappush(heap, (-pair_counts[p], p))
            elif d:
                pair_counts.pop(p, None)
        if progress is not None and (len(merges) % report_every == 0 or len(merges) == n_merges):
            progress(len(merges), n_merges)
    if progress is not None and len(merges) < n_merges:
        progress(n_merges, n_merges)  # finished early: the corpus ran out of pairs to merge
    return BPETokenizer(merges)


# ---- What stage 1 measures: compression and round trips


def token_spans(tokenizer: Tokenizer, text: str) -> list[dict]:
    """Each token of ``text`` as ``{"id", "text"}`` (text readable, as ``token_text`` shows it)."""
    return [{"id": i, "text": tokenizer.token_text(i)} for i in tokenizer.encode(text)]


def chars_per_token(text: str, ids: list[int]) -> float:
    """Compression: how many characters one token covers on average (higher = shorter sequences)."""
    return len(text) / len(ids) if ids else 0.0


def first_difference(original: str, decoded: str) -> int | None:
    """Index of the first character where the two texts differ, or None when they are equal."""
    if original == decoded:
        return None
    return next((i for i, (a, b) in enumerate(zip(original, decoded)) if a != b),
                min(len(original), len(decoded)))


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
