"""Per-token loss ("surprise"): how many nats each real next token of a text cost the model.

    python -m core surprise --run my-run --text "To be, or not to be"
    python -m core surprise --run tuned --prompt "Name a colour." --text "Blue."   # an instruction answer

The last stdout line is JSON: `tokens` (the text's tokens), `losses` (one per predicted token, so
one fewer than the tokens), `mean_loss`, and `forward_loss`, the loss `GPT.forward` reports on the
same ids (they agree: cross-entropy is the mean of the per-token losses).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from core.gpt import microscope
from core.lab import models
from core.lab.cli import option
from core.stages.generate import TEMPLATES, Subject, encode, fit, open_subject, wrap_prompt

COMMAND = "surprise"
ALTERNATIVES = 5


@dataclass
class Settings:
    run: str = option("", metavar="RUN", help="a run holding a language model")
    text: str = option("", help="the text to score (with --prompt: the answer to score)")
    prompt: str | None = option(None, help="an instruction: --text is scored as its answer, in the run's template")
    template: str = option("auto", choices=TEMPLATES, help="template for --prompt (auto: the run's own)")


def score(subject: Subject, settings: Settings) -> dict:
    """Per-token loss of a text (or of an answer after its prompt) on a loaded run."""
    if settings.prompt is None:
        ids, note = encode(subject, settings.text, keep="start")
        answer_start = 0
    else:  # prompt and answer encoded apart, exactly as instruction tuning encodes them
        template = subject.template if settings.template == "auto" else settings.template
        if not settings.text.strip():
            raise microscope.MicroscopeError("The answer is empty: type the answer to score.")
        prompt_ids = subject.tokenizer.encode(wrap_prompt(settings.prompt, template))
        answer_start = len(prompt_ids)
        ids, note = fit(subject, prompt_ids + subject.tokenizer.encode(settings.text), keep="start")
    if len(ids) < 2:
        raise microscope.MicroscopeError("The text is a single token: per-token loss needs at least two "
                                         "(the model reads one and predicts the next).")
    with models.generation_threads(subject.model):
        seen = microscope.surprise(subject.model, ids, ALTERNATIVES)
        with torch.inference_mode():
            idx = torch.tensor([ids])
            _, forward_loss = subject.model(idx[:, :-1], targets=idx[:, 1:])
    losses = seen["losses"].tolist()
    return {
        "run_id": subject.run_id, "note": note, "tokens": [subject.label(i) for i in ids], "ids": ids,
        "losses": [round(x, 6) for x in losses], "mean_loss": sum(losses) / len(losses),
        "forward_loss": float(forward_loss),
        "p_real": [round(p, 6) for p in seen["p_real"].tolist()],
        "alternatives": [[{"token": subject.label(i), "p": round(p, 6)} for i, p in zip(row_i, row_p)]
                         for row_i, row_p in zip(seen["top_ids"].tolist(), seen["top_probs"].tolist())],
        "answer_start": min(answer_start, len(ids)),  # tokens before this belong to the prompt
    }


def run(settings: Settings, progress=None) -> dict:
    result = score(open_subject(settings.run), settings)
    if progress is not None:
        for token, loss in zip(result["tokens"][1:], result["losses"]):
            progress({"token": token, "loss": loss})
    return result


def print_progress(record: dict) -> None:
    """One line per predicted token: how many nats it cost."""
    print(f"{record['token']!r:<20} {record['loss']:7.3f} nats", file=sys.stderr)


CODE = {"surprise": (microscope.per_token_loss, microscope.surprise)}
