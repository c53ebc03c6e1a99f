"""Stage 7: an LLM judge grades the answers, against a frozen rubric.

An instruction like "Name three animals active during the day" has no single exact answer, so
"did fine-tuning help?" needs a grader. Here the grader is another language model. This file is
the lesson of that grading, read top to bottom:

1. the **rubric**: a versioned text that is never edited in place; its sha256 travels with every
   score, so a score always says exactly which instructions produced it;
2. the **prompts**: single-answer grading (a 0-100 score, 1-5 per criterion and a rationale) and
   **pairwise** comparison (answer A vs answer B), asked in both orders because judges favour
   whichever answer they read first;
3. **reading the replies**: JSON first, then careful repairs, never a guessed number;
4. the **statistics**: a mean with a bootstrap 95% interval, the pairwise win rate (orders that
   disagree count as ties) and ROUGE-L, the word overlap with the reference, to show how
   differently the two measure "good".

Talking to the judge over HTTP (retries, caching, threads) is machinery: `core/lab/judge_client.py`.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------
# 1. The frozen rubric
# --------------------------------------------------------------------------------------------

RUBRIC_KEYS = ("version", "overall", "criteria", "judge_instructions", "single_format",
               "pairwise_instructions", "pairwise_format")


@dataclass(frozen=True)
class Rubric:
    version: str
    data: dict      # the parsed file: overall score, criteria, the judge's instructions
    sha256: str     # of the file's bytes: the identity stored next to every score
    text: str       # the file as written, shown read-only on the page

    @property
    def criteria(self) -> list[dict]:
        return self.data["criteria"]

    @property
    def overall(self) -> dict:
        return self.data["overall"]


# --------------------------------------------------------------------------------------------
# 2. Prompts, and the JSON shape we ask the judge to follow
# --------------------------------------------------------------------------------------------

def format_task(instruction: str, input_text: str = "") -> str:
    """The task as the model saw it (the reference book's Alpaca-style layout)."""
    text = f"### Instruction:\n{instruction.strip()}"
    if input_text and input_text.strip():
        text += f"\n\n### Input:\n{input_text.strip()}"
    return text


def single_messages(rubric: Rubric, instruction: str, input_text: str, reference: str,
                    answer: str) -> list[dict]:
    """The chat that asks the judge to grade one answer against the reference."""
    criteria = "\n".join(f"- {c['name']} ({c['min']}-{c['max']}): {c['description']}"
                         for c in rubric.criteria)
    overall = rubric.overall
    user = (f"{format_task(instruction, input_text)}\n\n### Reference answer:\n{reference.strip()}\n\n"
            f"### Response to grade:\n{answer.strip()}\n\n"
            f"Criteria:\n{criteria}\n- score ({overall['min']}-{overall['max']}): {overall['description']}\n\n"
            f"{rubric.data['single_format']}")
    return [{"role": "system", "content": rubric.data["judge_instructions"]},
            {"role": "user", "content": user}]


def pairwise_messages(rubric: Rubric, instruction: str, input_text: str, reference: str,
                      answer_a: str, answer_b: str) -> list[dict]:
    """The chat that asks which of two answers is better. Asked twice, A and B swapped."""
    user = (f"{format_task(instruction, input_text)}\n\n### Reference answer:\n{reference.strip()}\n\n"
            f"### Response A:\n{answer_a.strip()}\n\n### Response B:\n{answer_b.strip()}\n\n"
            f"{rubric.data['pairwise_format']}")
    return [{"role": "system", "content": rubric.data["pairwise_instructions"]},
            {"role": "user", "content": user}]


def single_schema(rubric: Rubric) -> dict:
    """JSON schema of a single-answer judgement (strict mode: every key required, no extras).

    Each number also lists its allowed values (`enum`): a constrained decoder that ignores
    minimum/maximum (outlines' regex for "integer" does) then still cannot write 99999."""
    def whole(low: int, high: int) -> dict:
        return {"type": "integer", "minimum": low, "maximum": high, "enum": list(range(low, high + 1))}

    criteria = {c["name"]: whole(c["min"], c["max"]) for c in rubric.criteria}
    return {"type": "object", "additionalProperties": False,
            "required": ["criteria", "score", "rationale"],
            "properties": {
                "criteria": {"type": "object", "additionalProperties": False,
                             "required": list(criteria), "properties": criteria},
                "score": whole(rubric.overall["min"], rubric.overall["max"]),
                "rationale": {"type": "string"}}}


PAIRWISE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["winner", "rationale"],
                   "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]},
                                  "rationale": {"type": "string"}}}


def with_schema_in_prompt(messages: list[dict], schema: dict) -> list[dict]:
    """The same chat with the JSON schema spelled out at the end (for servers that can only be
    told "reply in JSON", not which JSON)."""
    note = ("\n\nReply with one JSON object that follows this JSON schema:\n"
            + json.dumps(schema, separators=(",", ":")))
    return messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + note}]


# --------------------------------------------------------------------------------------------
# 3. Reading replies: structured JSON first, then repairs, never a guess
# --------------------------------------------------------------------------------------------

class ReplyUnreadable(Exception):
    """A reply that is not a valid judgement; the message says why (then asked again)."""


MAX_REPLY_CHARS = 20_000   # a judgement is a few hundred characters; a runaway reply is cut here
MAX_NESTING = 32           # a judgement nests 2 levels; a deeper reply is refused before parsing
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_BRACKETED_NUMBER = re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]")
_BARE_NUMBER = re.compile(r"\s*(?:(?:score|rating)\s*[:=]?\s*)?(-?\d+(?:\.\d+)?)\s*(?:/\s*100)?\s*\.?\s*", re.I)


def nesting_depth(text: str) -> int:
    """How deeply `{` and `[` nest in the text (a cheap count, strings not excluded)."""
    depth = deepest = 0
    for ch in text:
        if ch in "{[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "}]":
            depth = max(0, depth - 1)
    return deepest


def _loads_object(text: str) -> dict | None:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def extract_json_object(text: str) -> tuple[dict, str] | None:
    """The JSON object inside a reply and how it was found, or None.

    Tried in order: the whole reply, a ```json fenced block, the first `{...}` that parses.
    """
    if len(text) > MAX_REPLY_CHARS or nesting_depth(text) > MAX_NESTING:
        return None
    obj = _loads_object(text.strip())
    if obj is not None:
        return obj, "json"
    for match in _FENCE.finditer(text):
        obj = _loads_object(match.group(1).strip())
        if obj is not None:
            return obj, "fenced json"
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj, "first json object"
    return None


def _as_number(value) -> float | None:
    """A JSON number (or a string holding only one); booleans and NaN are not numbers here."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+(?:\.\d+)?\s*", value):
        return float(value)
    return None


def _check_range(name: str, value, low: float, high: float) -> float:
    number = _as_number(value)
    if number is None:
        raise ReplyUnreadable(f"{name} is {str(value)[:40]!r}, not a number")
    if not low <= number <= high:
        raise ReplyUnreadable(f"{name} {number:g} is outside {low:g}-{high:g}")
    return number


def _single_from_json(obj: dict, method: str, rubric: Rubric) -> dict:
    if "score" not in obj:
        raise ReplyUnreadable("the JSON object has no \"score\"")
    score = _check_range("score", obj["score"], rubric.overall["min"], rubric.overall["max"])
    given = obj.get("criteria") or {}
    if not isinstance(given, dict):
        raise ReplyUnreadable("\"criteria\" is not an object")
    criteria = {c["name"]: _check_range(c["name"], given[c["name"]], c["min"], c["max"])
                for c in rubric.criteria if c["name"] in given}
    rationale = obj.get("rationale", "")
    return {"score": score, "criteria": criteria,
            "rationale": (rationale if isinstance(rationale, str) else json.dumps(rationale))[:2000],
            "parse_method": method}


def parse_single_reply(text: str, rubric: Rubric) -> dict:
    """`{"score", "criteria", "rationale", "parse_method"}` from a reply, or ReplyUnreadable.

    Accepted: a JSON object (whole, fenced or embedded in prose), `[[n]]`, or a reply that is
    only a number ("85", "Score: 85", "85/100"). A number somewhere inside prose is *not*
    accepted: "4 of 5 facts are right, 70" could mean either, and guessing would invent a score.
    """
    low, high = rubric.overall["min"], rubric.overall["max"]
    found = extract_json_object(text)
    if found is not None:
        return _single_from_json(*found, rubric)
    text = text[:MAX_REPLY_CHARS]
    bracketed = set(_BRACKETED_NUMBER.findall(text))
    if len(bracketed) == 1:
        score = _check_range("score", bracketed.pop(), low, high)
        rationale = _BRACKETED_NUMBER.sub("", text).strip()[:2000]
        return {"score": score, "criteria": {}, "rationale": rationale, "parse_method": "[[n]]"}
    bare = _BARE_NUMBER.fullmatch(text)
    if bare:
        score = _check_range("score", bare.group(1), low, high)
        return {"score": score, "criteria": {}, "rationale": "", "parse_method": "bare number"}
    raise ReplyUnreadable("the reply holds no JSON object, no [[score]], and is not just a number")


_VERDICTS = {"a": "A", "b": "B", "tie": "tie", "c": "tie", "draw": "tie", "equal": "tie"}


def parse_pairwise_reply(text: str) -> dict:
    """`{"winner": "A"|"B"|"tie", "rationale", "parse_method"}` or ReplyUnreadable."""
    found = extract_json_object(text)
    if found is not None:
        obj, method = found
        winner = _VERDICTS.get(str(obj.get("winner", ""))[:20].strip().lower())
        if winner is None:
            raise ReplyUnreadable(f"\"winner\" is {str(obj.get('winner'))[:40]!r}, not A, B or tie")
        return {"winner": winner, "rationale": str(obj.get("rationale", ""))[:2000], "parse_method": method}
    text = text[:MAX_REPLY_CHARS]
    bracketed = set(m.lower() for m in re.findall(r"\[\[\s*(A|B|C|tie)\s*\]\]", text, re.I))
    if len(bracketed) == 1:
        return {"winner": _VERDICTS[bracketed.pop()], "parse_method": "[[x]]",
                "rationale": re.sub(r"\[\[.*?\]\]", "", text).strip()[:2000]}
    bare = re.fullmatch(r"\s*(?:winner\s*[:=]?\s*)?(A|B|tie)\s*\.?\s*", text, re.I)
    if bare:
        return {"winner": _VERDICTS[bare.group(1).lower()], "rationale": "", "parse_method": "bare verdict"}
    raise ReplyUnreadable("the reply names no winner (A, B or tie)")


def repair_messages(messages: list[dict], reply: str, reason: str, reminder: str) -> list[dict]:
    """Show the judge its own unusable reply and why: cheaper than a blind retry at temperature 0."""
    return list(messages) + [
        {"role": "assistant", "content": reply[:MAX_REPLY_CHARS]},
        {"role": "user", "content": f"That reply could not be used: {reason}. {reminder}"}]


# --------------------------------------------------------------------------------------------
# 4. Reference overlap and statistics
# --------------------------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, two rows)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str, max_words: int = 2000) -> float:
    """ROUGE-L F1 on lower-cased words: how much of the reference appears, in order, in the answer.

    It rewards copying the reference's wording, so "10 cm" vs "ten centimetres" scores low even
    though a judge calls both right — which is the point of showing it next to the judge.
    """
    cand, ref = _words(candidate)[:max_words], _words(reference)[:max_words]
    if not cand or not ref:
        return 0.0
    common = lcs_length(cand, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(cand), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def bootstrap_ci(values, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean (seeded, so the same scores give the same interval).

    Draw `resamples` samples of the same size with replacement, take each one's mean, and read the
    interval off the middle `level` of those means.
    """
    values = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
    if values.numel() == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, values.numel(), (resamples, values.numel()), generator=generator)  # (R, n)
    means = values[picks].mean(dim=1)                                                          # (R,)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return [round(float(low), 3), round(float(high), 3)]


def pairwise_outcome(first: str, second: str, ab: dict, ba: dict) -> str:
    """Combine both orders: a label, "tie", "inconsistent" (the orders disagree) or "failed".

    In order ab the first model's answer is A; in order ba it is B.
    """
    if ab.get("status") != "ok" or ba.get("status") != "ok":
        return "failed"
    winner_ab = {"A": first, "B": second, "tie": "tie"}[ab["winner"]]
    winner_ba = {"A": second, "B": first, "tie": "tie"}[ba["winner"]]
    return winner_ab if winner_ab == winner_ba else "inconsistent"


def _mean(values: list[float], digits: int) -> float | None:
    return round(statistics.fmean(values), digits) if values else None


def model_summary(singles: list[dict]) -> dict:
    """One model's single-answer records → mean score with its interval, ROUGE-L, failures."""
    ok = [r for r in singles if r["status"] == "ok"]
    scores = [r["score"] for r in ok]
    criteria: dict[str, list[float]] = {}
    for r in ok:
        for name, value in (r.get("criteria") or {}).items():
            criteria.setdefault(name, []).append(value)
    correlation = None
    rouge_ok = [r["rouge_l"] for r in ok]
    if len(ok) >= 3 and len(set(scores)) > 1 and len(set(rouge_ok)) > 1:
        correlation = round(statistics.correlation(scores, rouge_ok), 3)
    return {"judged": len(singles), "scored": len(ok), "failed": len(singles) - len(ok),
            "mean_score": _mean(scores, 3), "ci95": bootstrap_ci(scores),
            "rouge_l": _mean([r["rouge_l"] for r in singles], 4),
            "rouge_judge_correlation": correlation,
            "criteria": {k: round(statistics.fmean(v), 3) for k, v in criteria.items()}}


def pairwise_summary(pairs: list[dict]) -> dict | None:
    """Win / tie / loss rates of the second model against the first; failed pairs left out."""
    if not pairs:
        return None
    first, second = pairs[0]["first"], pairs[0]["second"]
    counted = [r for r in pairs if r["outcome"] != "failed"]
    n = len(counted)
    wins = sum(r["outcome"] == second for r in counted)
    losses = sum(r["outcome"] == first for r in counted)
    ties = n - wins - losses   # agreed ties plus inconsistent pairs
    rate = (lambda k: round(k / n, 4) if n else None)  # noqa: E731
    return {"first": first, "second": second, "compared": n, "wins": wins, "ties": ties,
            "losses": losses, "inconsistent": sum(r["outcome"] == "inconsistent" for r in counted),
            "failed": len(pairs) - n, "win_rate": rate(wins), "tie_rate": rate(ties),
            "loss_rate": rate(losses)}


def summarize(records: list[dict], labels: list[str]) -> dict:
    """Per-model means with intervals, ROUGE-L, failures, and the pairwise win/tie/loss rates."""
    models = {label: model_summary([r for r in records if r["kind"] == "single" and r["model"] == label])
              for label in labels}
    pairwise = pairwise_summary([r for r in records if r["kind"] == "pairwise"])
    headline = labels[-1]
    return {"n": len({r["item"] for r in records}), "judgements": len(records), "headline_model": headline,
            "mean_score": models[headline]["mean_score"] if models else None,
            "ci95": models[headline]["ci95"] if models else None,
            "failed": sum(r["status"] != "ok" for r in records),
            "cached": sum(bool(r.get("cached")) for r in records),
            "pairwise_win_rate": pairwise["win_rate"] if pairwise else None,
            "models": models, "pairwise": pairwise}
