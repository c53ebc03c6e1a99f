"""`python -m core tokenize`: stage 1 on its own.

Trains a tokeniser on a corpus, saves it as a run (`checkpoints/<run-id>/tokenizer.json`) that the
later stages can name with `--tokenizer <run-id>`, and prints how well it compresses the corpus:

    python -m core tokenize --data tinyshakespeare --tokenizer bpe --vocab-size 1000 --run-id bpe-1k
"""

from __future__ import annotations

import sys
import time

from core.lab import data, runs
from core.gpt import tokenizers
from core.lab.errors import RunExistsError


def add_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="data source name (see `data list`), upload:NAME or file:PATH")
    parser.add_argument("--tokenizer", choices=["char", "word", "bpe", "gpt2"], default="bpe",
                        help="which tokeniser to train (gpt2 is fixed, not trained)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"vocabulary size for bpe (at least 257, default {tokenizers.DEFAULT_BPE_VOCAB}) "
                             f"or word (most frequent pieces kept, default {tokenizers.DEFAULT_WORD_VOCAB})")
    parser.add_argument("--run-id", default=None, help="name of the run to create (default: tokenizer-<time>)")


def _progress_printer():
    """Print merge progress once per 10% (it may land in a job log, where '\\r' tricks fail)."""
    last_decile = -1

    def progress(done: int, total: int) -> None:
        nonlocal last_decile
        decile = done * 10 // max(total, 1)
        if decile != last_decile:
            last_decile = decile
            print(f"merges {done:,}/{total:,}", file=sys.stderr, flush=True)

    return progress


def train(kind: str, text: str, vocab_size: int, progress=None) -> tokenizers.Tokenizer:
    """The tokeniser of ``kind`` trained on ``text`` (``vocab_size`` is ignored by char and gpt2)."""
    if kind == "char":
        return tokenizers.train_char(text)
    if kind == "word":
        return tokenizers.train_word(text, vocab_size or tokenizers.DEFAULT_WORD_VOCAB)
    if kind == "bpe":
        return tokenizers.train_bpe(text, vocab_size or tokenizers.DEFAULT_BPE_VOCAB, progress=progress)
    return tokenizers.gpt2_tokenizer()


def run(args) -> dict:
    run_id = runs.validate_run_id(args.run_id) if args.run_id else runs.new_run_id("tokenizer")
    # refuse a taken name before spending time on training; nothing saved is touched
    if (runs.run_dir(run_id) / "config.json").exists():
        raise RunExistsError(f"A run named {run_id!r} already exists: choose another name.")
    text = data.read_text(args.data)
    print(f"read {args.data}: {len(text):,} characters", file=sys.stderr)

    start = time.perf_counter()
    tokenizer = train(args.tokenizer, text, args.vocab_size, progress=_progress_printer())
    train_seconds = time.perf_counter() - start
    ids = tokenizer.encode(text)
    seconds = time.perf_counter() - start
    print(f"{args.tokenizer}: {tokenizer.vocab_size:,} tokens in the vocabulary, "
          f"{len(ids):,} tokens in the corpus", file=sys.stderr)

    tokenizers.save_tokenizer_run(run_id, tokenizer, {
        "data": args.data,
        "requested_vocab_size": args.vocab_size,
        "corpus_characters": len(text),
        "corpus_tokens": len(ids),
    })
    return {
        "run_id": run_id,
        "vocab_size": tokenizer.vocab_size,
        "tokens": len(ids),
        "chars_per_token": round(tokenizers.chars_per_token(text, ids), 4),
        "train_seconds": round(train_seconds, 3),
        "seconds": round(seconds, 3),
    }
