"""Stage 1, text and tokens: train a tokeniser on a corpus and save it as a run that later stages
name with `--tokenizer <run-id>`; report how well it compresses the corpus.

    python -m core tokenize --data tinyshakespeare --tokenizer bpe --vocab-size 1000 --run-id bpe-1k
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from core.gpt import dataset
from core.gpt import tokenizers as tok
from core.gpt.errors import GlassBoxError, TokenizerError
from core.lab import data, learners, runs
from core.lab.cli import option
from core.lab.errors import RunExistsError
from core.lab.tokenizer_files import TOKENIZER_FILE, gpt2_tokenizer, load_tokenizer, save_tokenizer

COMMAND = "tokenize"
KINDS = ("char", "word", "bpe", "gpt2")


@dataclass
class Settings:
    data: str = option(help="data source name (see `data list`), upload:NAME or file:PATH")
    tokenizer: str = option("bpe", choices=KINDS, help="which tokeniser to train (gpt2 is fixed, not trained)")
    vocab_size: int | None = option(None, help=f"vocabulary size for bpe (at least 257, default {tok.DEFAULT_BPE_VOCAB}) "
                                               f"or word (most frequent pieces kept, default {tok.DEFAULT_WORD_VOCAB})")
    run_id: str | None = option(None, help="name of the run to create (default: tokenizer-<time>)")

    def __post_init__(self):
        if not isinstance(self.data, str) or not self.data:
            raise TokenizerError("Name a corpus to learn from with --data (see `python -m core data list`).")
        if self.tokenizer not in KINDS:
            raise TokenizerError(f"Unknown tokeniser {self.tokenizer!r}: choose one of {', '.join(KINDS)}.")


def train(kind: str, text: str, vocab_size: int | None, progress=None) -> tok.Tokenizer:
    """The tokeniser of ``kind`` trained on ``text`` (``vocab_size`` is ignored by char and gpt2)."""
    if kind == "char":
        return tok.train_char(text)
    if kind == "word":
        return tok.train_word(text, vocab_size or tok.DEFAULT_WORD_VOCAB)
    if kind == "bpe":
        return tok.train_bpe(text, vocab_size or tok.DEFAULT_BPE_VOCAB, progress=progress)
    return gpt2_tokenizer()


def _merge_reporter(progress):
    """Pass merge progress on once per 10% (it may land in a job log, where '\\r' tricks fail)."""
    last = [-1]

    def report(done: int, total: int) -> None:
        decile = done * 10 // max(total, 1)
        if progress is not None and decile != last[0]:
            last[0] = decile
            progress({"merges": done, "total": total})

    return report


def run(settings: Settings, progress=None, trained: tok.Tokenizer | None = None, owner: str | None = None) -> dict:
    """Train (or take the page's ``trained`` tokeniser), then write the run through the run store:
    config.json, tokenizer.json, status finished. A taken run id is refused before any training.
    `owner`: the learner saving it from the page (core.lab.learners)."""
    run_id = runs.validate_run_id(settings.run_id) if settings.run_id else runs.new_run_id("tokenizer")
    if (runs.run_dir(run_id) / "config.json").exists():
        raise RunExistsError(f"A run named {run_id!r} already exists: choose another name.")
    text = data.read_text(settings.data)
    if progress is not None:
        progress({"read": settings.data, "characters": len(text)})
    start = time.perf_counter()
    tokenizer = trained or train(settings.tokenizer, text, settings.vocab_size, _merge_reporter(progress))
    train_seconds = time.perf_counter() - start
    ids = tokenizer.encode(text)
    seconds = time.perf_counter() - start
    if progress is not None:
        progress({"kind": settings.tokenizer, "vocab_size": tokenizer.vocab_size, "tokens": len(ids)})
    config = {"tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "data": settings.data,
              "requested_vocab_size": settings.vocab_size, "corpus_characters": len(text),
              "corpus_tokens": len(ids)}
    owner = learners.learner_name(owner) if owner is not None else None
    with runs.quick_run(run_id, "tokenizer", config, owner=owner) as created:
        save_tokenizer(tokenizer, created.path / TOKENIZER_FILE)
    return {"run_id": run_id, "vocab_size": tokenizer.vocab_size, "tokens": len(ids),
            "chars_per_token": round(tok.chars_per_token(text, ids), 4),
            "train_seconds": round(train_seconds, 3), "seconds": round(seconds, 3)}


def print_progress(record: dict) -> None:
    if "merges" in record:
        line = f"merges {record['merges']:,}/{record['total']:,}"
    elif "read" in record:
        line = f"read {record['read']}: {record['characters']:,} characters"
    else:
        line = (f"{record['kind']}: {record['vocab_size']:,} tokens in the vocabulary, "
                f"{record['tokens']:,} tokens in the corpus")
    print(line, file=sys.stderr, flush=True)


def save_tokenizer_run(run_id: str, tokenizer: tok.Tokenizer, config: dict) -> Path:
    """A stage-1 run holding ``tokenizer`` as it is (no corpus needed); refuses a taken id untouched."""
    with runs.quick_run(run_id, "tokenizer", {"tokenizer": tokenizer.kind,
                                              "vocab_size": tokenizer.vocab_size, **config}) as created:
        return save_tokenizer(tokenizer, created.path / TOKENIZER_FILE)


def results(run_id: str) -> dict:
    """A saved tokeniser run: its config and the tokeniser itself."""
    run = runs.open_run(run_id)
    return {"config": run.config, "tokenizer": load_tokenizer(run.path / TOKENIZER_FILE)}


# ---------------------------------------------------------------------------- what page 1 reads


def text_sources(owner: str | None = None, everyone: bool = True) -> list[str]:
    """Text sources on this machine; `owner`'s uploads first (core.lab.data.list_uploads)."""
    return [s["name"] for s in data.list_sources(owner, everyone)
            if s.get("kind") == "text" and s.get("available")]


def merges_table(tokenizer: tok.BPETokenizer, limit: int = 20) -> list[dict]:
    """The first merges learnt, readable: rank, left + right -> new token."""
    show = lambda i: tok.visible(tokenizer.token_text(i))  # noqa: E731
    return [{"rank": n + 1, "left": show(a), "right": show(b), "new token": show(256 + n), "id": 256 + n}
            for n, (a, b) in enumerate(tokenizer.merges[:limit])]


def corpus_stats(text: str) -> dict:
    return {"characters": len(text), "bytes": len(text.encode("utf-8")),
            "lines": text.count("\n") + (1 if text and not text.endswith("\n") else 0),
            "words": len(text.split()), "distinct characters": len(set(text))}


# the corpus registry and the textbook, as page 1 uses them (pages import only core.stages)
read_text, save_upload, next_token_pairs = data.read_text, data.save_upload, dataset.next_token_pairs
BPETokenizer, Tokenizer, MIN_BPE_VOCAB = tok.BPETokenizer, tok.Tokenizer, tok.MIN_BPE_VOCAB
round_trip, chars_per_token, compression_curve = tok.round_trip, tok.chars_per_token, tok.compression_curve
__all__ = ["GlassBoxError"]  # re-exported for the page

CODE = {
    "merges": [tok.train_bpe_naive, tok.merge_pair],
    "fast": [tok.train_bpe],
    "encode": [tok.BPETokenizer._encode_piece, tok.BPETokenizer.encode],
    "compression": [tok.compression_curve, tok.chars_per_token],
    "round_trip": [tok.round_trip, tok.first_difference],
    "pairs": [dataset.next_token_pairs],
}
