"""Tokens as a learner sees them: the one readable-token label and the one coloured-token HTML.

Pages 1 and 3, the microscope and the chat page draw tokens with these helpers. Every label is
HTML-escaped: text from users, corpora and models is never markup.
"""

from __future__ import annotations

import html
import re

from core.gpt.tokenizers import visible

# Pastel colours that cycle so neighbouring tokens are told apart; special tokens stand out.
SPAN_COLOURS = ("#fde68a", "#bbf7d0", "#bfdbfe", "#fbcfe8", "#ddd6fe", "#fed7aa")
SPECIAL_STYLE = "background:#1e293b;color:#f8fafc;font-weight:600"
_COLOUR = re.compile(r"#[0-9a-fA-F]{3}(?:[0-9a-fA-F]{3})?|rgba?\(\s*[\d.]+%?(?:\s*,\s*[\d.]+%?){2,3}\s*\)")
_SPAN_STYLE = "border-radius:3px;padding:1px 2px;margin:1px;white-space:pre-wrap;font-family:monospace"


def readable_token(tokenizer, token_id: int) -> str:
    """A token's text with its whitespace made visible (bytes that are not whole characters: \\xNN)."""
    return visible(tokenizer.token_text(int(token_id)))


def spans_of(tokenizer, ids, special_ids=None) -> list[dict]:
    """``[{"id", "text", "special"}]`` for ``ids``: what `token_spans_html` draws."""
    special_ids = tokenizer.special_ids() if special_ids is None else set(special_ids)
    return [{"id": int(i), "text": tokenizer.token_text(int(i)), "special": int(i) in special_ids} for i in ids]


def token_spans_html(spans: list[dict], show_ids: bool = False, title=None, colour=None) -> str:
    """Coloured HTML spans, one per token. ``span["special"]`` draws a marker token dark;
    ``title(span)`` (optional) gives each span's hover text (default: its id); ``colour(span)``
    (optional) its CSS background colour (e.g. by the model's loss on it) instead of the cycle."""
    parts = []
    for n, span in enumerate(spans):
        label = html.escape(visible(span["text"]))
        if span["text"].endswith("\n"):
            label += "<br>"  # keep the line structure of the text
        if show_ids:
            label += f'<sub style="opacity:.6">{int(span["id"])}</sub>'
        background = _css_colour(colour(span)) if colour else SPAN_COLOURS[n % len(SPAN_COLOURS)]
        style = SPECIAL_STYLE if span.get("special") else f"background:{background};color:#111"
        hover = html.escape(str(title(span)) if title else f"id {int(span['id'])}", quote=True)
        parts.append(f'<span title="{hover}" style="{style};{_SPAN_STYLE}">{label}</span>')
    return '<div style="line-height:2.1">' + "".join(parts) + "</div>"


def _css_colour(value) -> str:
    """Only a colour may reach the style attribute: #rgb/#rrggbb or rgb()/rgba() of numbers."""
    text = str(value).strip()
    if _COLOUR.fullmatch(text):
        return text
    raise ValueError(f"Not a CSS colour: {text!r}")
