"""What the judge reads from disk: the frozen rubrics, and the answers to judge.

A rubric is a JSON file in `core/lab/rubrics/`, never edited in place (a change is a new version);
its sha256 becomes `Rubric.sha256`, stored next to every score. The answers come from a run's
`responses.json` (stage 6, or the preference-tuning stage) or from a registry data set.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from core.gpt.judge import RUBRIC_KEYS, Rubric
from core.lab import data as data_registry
from core.lab import runs
from core.lab.errors import DataError, JudgeError

RUBRICS_DIR = Path(__file__).resolve().parent / "rubrics"
DEFAULT_RUBRIC = "instruction-v1"
RESPONSES_FILE = "responses.json"


def rubric_versions() -> list[str]:
    return sorted(p.stem for p in RUBRICS_DIR.glob("*.json"))


def load_rubric(version: str = DEFAULT_RUBRIC) -> Rubric:
    """Read a rubric file by version; its sha256 identifies it in every stored judgement."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", version or "") or ".." in version:
        raise JudgeError(f"{str(version)[:80]!r} is not a rubric version. Known: {', '.join(rubric_versions())}.")
    path = RUBRICS_DIR / f"{version}.json"
    if not path.is_file():
        raise JudgeError(f"No rubric {version!r}. Known: {', '.join(rubric_versions())}.")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
        for key in RUBRIC_KEYS:
            data[key]  # noqa: B018 — a KeyError names the missing part
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise JudgeError(f"The rubric file {path.name} is broken ({exc}).") from None
    return Rubric(version=data["version"], data=data, sha256=hashlib.sha256(raw).hexdigest(),
                  text=raw.decode("utf-8"))


@dataclass
class EvalItem:
    index: int
    instruction: str
    input: str
    reference: str
    answers: dict[str, str]   # label -> the answer that label's model gave


# Registry sets that carry model answers: name -> [(label, key in the record)].
DATA_ANSWER_KEYS = {
    "instruction-data-with-response": [("model_response", "model_response")],
    "eval-example-data": [("model 1", "model 1 response"), ("model 2", "model 2 response")],
}
RUN_ANSWER_KEYS = [("base", "base_response"), ("tuned", "tuned_response")]
RUN_STAGES = ("instruct", "prefer")   # runs whose responses.json the judge reads


def run_answer_keys(records) -> list[tuple[str, str]]:
    """The answers a run's responses.json holds: every `<label>_response` key of its first record,
    in the order written (the first is the baseline of a pairwise comparison). Stage 6 writes
    base_response, tuned_response; preference tuning sft_response, dpo_response."""
    first = records[0] if isinstance(records, list) and records and isinstance(records[0], dict) else {}
    found = [(key[: -len("_response")], key) for key in first if key.endswith("_response") and key != "_response"]
    return found or RUN_ANSWER_KEYS


def items_from_records(records, answer_keys: list[tuple[str, str]], origin: str) -> list[EvalItem]:
    """Validate a list of JSON records and turn them into EvalItems (DataError on bad shape)."""
    if not isinstance(records, list) or not records:
        raise DataError(f"{origin} must hold a non-empty JSON list of records.")
    items = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"Record {i} of {origin} is not a JSON object.")
        missing = [k for k in ["instruction", "output", *[key for _, key in answer_keys]] if k not in rec]
        if missing:
            raise DataError(f"Record {i} of {origin} lacks {', '.join(missing)}.")
        fields = {k: rec.get(k) if rec.get(k) is not None else "" for k in
                  ["instruction", "input", "output", *[key for _, key in answer_keys]]}
        if not all(isinstance(v, str) for v in fields.values()):
            raise DataError(f"Record {i} of {origin} has a field that is not text.")
        items.append(EvalItem(index=i, instruction=fields["instruction"], input=fields["input"],
                              reference=fields["output"],
                              answers={label: fields[key].strip() for label, key in answer_keys}))
    return items


def _read_json_file(path: Path, origin: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataError(f"Cannot read {origin} ({Path(path).name}): {str(exc)[:200]}") from None


def load_items(run: str | None = None, data: str | None = None) -> tuple[list[EvalItem], list[str]]:
    """The items to judge and the answer labels, from a run's answers or a registry data set."""
    if bool(run) == bool(data):
        raise JudgeError("Judge either a stage-6 run (--run) or a data set (--data), not both or neither.")
    if run:
        path = runs.run_dir(run) / RESPONSES_FILE
        if not path.is_file():
            raise DataError(f"Run {run!r} has no responses.json: judge an instruction-tuned (stage 6) run "
                            "that has finished generating its test answers.")
        origin = f"responses.json of run {run!r}"
        records = _read_json_file(path, origin)
        answer_keys = run_answer_keys(records)
    else:
        if data not in DATA_ANSWER_KEYS:
            raise DataError(f"The data set {data!r} holds no model answers. Choose one of: "
                            f"{', '.join(DATA_ANSWER_KEYS)}, or a stage-6 run.")
        answer_keys = DATA_ANSWER_KEYS[data]
        records = _read_json_file(data_registry.locate(data), data)
        origin = data
    return items_from_records(records, answer_keys, origin), [label for label, _ in answer_keys]


def runs_with_answers() -> list[str]:
    """Runs a judge can read: stage-6 (and preference) runs that wrote their responses.json."""
    stages = tuple(s for s in RUN_STAGES if s in runs.STAGES)
    return [r.id for r in runs.list_runs(stages) if not r.error and (r.path / RESPONSES_FILE).is_file()]


def data_available(name: str) -> bool:
    return data_registry.find(name) is not None
