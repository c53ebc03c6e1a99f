"""Logit lens: read every layer's residual stream through the final norm and the output head.

    python -m core lens --run my-run --text "To be, or not to be"

The last stdout line is JSON: `layers` (0 = the embeddings, then one per block), `tokens`, and
`top_tokens` / `top_probs`, each layers × positions: the token each layer would predict next at
each position, and its probability. The last layer's row is the model's own prediction.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from core.gpt import microscope
from core.gpt.model import GPT
from core.lab import models
from core.lab.cli import option
from core.stages.generate import Subject, encode, open_subject

COMMAND = "lens"


@dataclass
class Settings:
    run: str = option("", metavar="RUN", help="a run holding a language model")
    text: str = option("", help="the text to read through the lens")
    layer: int | None = option(None, help="with --head: also return that block's attention weights (T x T)")
    head: int | None = option(None, help="the attention head of --layer (0-based)")

    def __post_init__(self):
        if (self.layer is None) != (self.head is None):
            raise microscope.MicroscopeError("Give --layer and --head together (or neither).")


def read(subject: Subject, settings: Settings) -> dict:
    """The logit lens (and, if asked, the attention maps) of a text on a loaded run."""
    ids, note = encode(subject, settings.text, keep="start")
    with models.generation_threads(subject.model):
        lens = microscope.logit_lens(subject.model, ids)
        attention = attention_of(subject, ids, settings.layer, settings.head)
    top_ids = lens["top_ids"][..., 0].tolist()
    result = {
        "run_id": subject.run_id, "note": note,
        "layers": ["embeddings"] + [f"block {i}" for i in range(len(top_ids) - 1)],
        "tokens": [subject.label(i) for i in ids], "ids": ids,
        "top_tokens": [[subject.label(i) for i in row] for row in top_ids],
        "top_ids": top_ids,
        "top_probs": [[round(p, 6) for p in row] for row in lens["top_probs"][..., 0].tolist()],
    }
    if attention is not None:
        result["attention"] = [[round(w, 5) for w in row] for row in attention.tolist()]
    return result


def attention_of(subject: Subject, ids: list[int], layer: int | None, head: int | None):
    """The (T, T) attention weights of one block and head (row i: where token i looks), or None."""
    if layer is None or head is None:
        return None
    config = subject.model.config
    if not 0 <= layer < config.n_layer or not 0 <= head < config.n_head:
        raise microscope.MicroscopeError(f"This model has blocks 0–{config.n_layer - 1} and heads "
                                         f"0–{config.n_head - 1}; got block {layer}, head {head}.")
    return subject.model.attention_maps(torch.tensor([ids]))[layer, head]


def run(settings: Settings, progress=None) -> dict:
    result = read(open_subject(settings.run), settings)
    for row in zip(result["layers"], result["top_tokens"], result["top_probs"]):
        if progress is not None:
            progress(dict(zip(("layer", "tokens", "probs"), row)))
    return result


def print_progress(row: dict) -> None:
    """One line per layer: its top guess (and probability) at the first dozen positions."""
    cells = " ".join(f"{t[:8]!r:>10}{p:4.0%}" for t, p in zip(row["tokens"][:12], row["probs"][:12]))
    print(f"{row['layer']:<11} {cells}", file=sys.stderr)


CODE = {"lens": (GPT.residual_stream, microscope.logit_lens)}
