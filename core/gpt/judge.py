"""Stage 7: an LLM judge grades the answers, against a frozen rubric.

An instruction like "Name three animals active during the day" has no single exact answer, so
"did fine-tuning help?" needs a grader. Here the grader is another language model behind any
OpenAI-compatible chat-completions endpoint (OpenAI, Ollama, vLLM, llama.cpp, LM Studio). What the
learner sees on this stage:

- the **rubric**: a versioned JSON file that is never edited in place; its sha256 travels with
  every score, so a score always says exactly which instructions produced it;
- **single-answer grading**: a 0-100 score, 1-5 per criterion and a short rationale per answer;
- **pairwise** comparison (pre-trained vs instruction-tuned), asked in both orders because judges
  favour whichever answer they read first; when the two orders disagree it is counted as a tie;
- a mean with a bootstrap 95% interval, the number of failed judgements, and ROUGE-L (word
  overlap with the reference) next to the judge, to show how differently the two measure "good".

Judges are unreliable machines on unreliable networks, so this module owns the whole policy:
retries with backoff (honouring `Retry-After`), a fallback when the server refuses structured
output, repair-parsing of replies, failures recorded with the raw reply (never turned into a
number), and an on-disk cache so that a rerun or a resumed evaluation sends no request twice.

The API key lives only in memory (`EndpointSettings.api_key`, hidden from `repr`); it is never
part of a cache key, a file, a log line or an error message.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import json
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from core.lab import paths
from core.lab.errors import DataError, JudgeError

RUBRICS_DIR = Path(__file__).resolve().parent / "rubrics"
DEFAULT_RUBRIC = "instruction-v1"
CACHE_DIRNAME = ".judge-cache"


class EndpointUnusable(JudgeError):
    """The endpoint cannot be used at all (bad key, unknown model, nothing listening): stop."""


class ReplyUnreadable(Exception):
    """A reply that is not a valid judgement; the message says why (internal, then retried)."""


class RequestFailed(Exception):
    """One request failed for good after its retries (internal: the judgement is marked failed)."""


# --------------------------------------------------------------------------------------------
# Endpoint settings
# --------------------------------------------------------------------------------------------

@dataclass
class EndpointSettings:
    """Where the judge lives and how patiently we talk to it.

    `api_key` is excluded from `repr` and from `public()`: only the HTTP client ever sees it.
    """

    base_url: str
    model: str
    api_key: str = field(default="", repr=False, compare=False)
    timeout: float = 60.0           # seconds for one request
    temperature: float = 0.0        # a grader should be as repeatable as the server allows
    max_concurrency: int = 2        # requests in flight at once
    max_tokens: int | None = 400    # small local models may otherwise ramble until the context ends
    max_attempts: int = 4           # tries per request on 429 / 5xx / timeout
    parse_attempts: int = 3         # tries per judgement when the reply cannot be read
    backoff_s: float = 1.0          # first wait; doubles on each retry
    max_backoff_s: float = 60.0     # longest wait we accept (also for Retry-After)

    def __post_init__(self):
        self.base_url = (self.base_url or "").strip().rstrip("/")
        self.model = (self.model or "").strip()
        if not re.match(r"^https?://[^/\s]+", self.base_url):
            raise JudgeError(f"The judge base URL must start with http:// or https:// "
                             f"(for example http://localhost:11434/v1), got {redact_url(self.base_url)!r}.")
        if "@" in urlsplit(self.base_url).netloc:
            raise JudgeError("Put the password or key in the API key field, not in the base URL "
                             "(a URL is stored with the run; the key never is).")
        if not self.model:
            raise JudgeError("Name the judge model (for example gpt-4o-mini, or llama3.2 for Ollama).")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            raise JudgeError("The judge timeout must be a positive number of seconds.")
        if not (isinstance(self.max_concurrency, int) and 1 <= self.max_concurrency <= 32):
            raise JudgeError("Concurrent judge requests must be between 1 and 32.")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 2):
            raise JudgeError("The judge temperature must be between 0 and 2.")

    def public(self) -> dict:
        """Everything worth recording about the endpoint, without the key (safe to write)."""
        return {"base_url": redact_url(self.base_url), "model": self.model, "timeout": self.timeout,
                "temperature": self.temperature, "max_concurrency": self.max_concurrency,
                "max_tokens": self.max_tokens}


def redact_url(url: str) -> str:
    """Drop `user:password@` from a URL, the one place a secret could hide in a base URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


@dataclass(frozen=True)
class Preset:
    base_url: str
    model: str
    needs_key: bool
    note: str


PRESETS: dict[str, Preset] = {
    "OpenAI": Preset("https://api.openai.com/v1", "gpt-4o-mini", True,
                     "Hosted; needs an API key and costs money per request."),
    "Ollama": Preset("http://localhost:11434/v1", "llama3.2", False,
                     "Local: `ollama pull llama3.2` then `ollama serve`. Any key works."),
    "vLLM": Preset("http://localhost:8000/v1", "Qwen/Qwen2.5-7B-Instruct", False,
                   "Local GPU server: `vllm serve Qwen/Qwen2.5-7B-Instruct`."),
    "llama.cpp server": Preset("http://localhost:8080/v1", "local", False,
                               "Local: `llama-server -m model.gguf` or "
                               "`python -m llama_cpp.server --model model.gguf` (see docs/offline-judge.md)."),
    "LM Studio": Preset("http://localhost:1234/v1", "local-model", False,
                        "Local: start the server in LM Studio's Developer tab; use the model id it shows."),
}


# --------------------------------------------------------------------------------------------
# The frozen rubric
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rubric:
    version: str
    data: dict
    sha256: str     # of the file's bytes: the identity stored next to every score
    text: str       # the file as written, shown read-only on the page

    @property
    def criteria(self) -> list[dict]:
        return self.data["criteria"]

    @property
    def overall(self) -> dict:
        return self.data["overall"]


def rubric_versions() -> list[str]:
    return sorted(p.stem for p in RUBRICS_DIR.glob("*.json"))


def load_rubric(version: str = DEFAULT_RUBRIC) -> Rubric:
    """Read a rubric file by version; its sha256 identifies it in every stored judgement."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", version or "") or ".." in version:
        raise JudgeError(f"{version!r} is not a rubric version. Known: {', '.join(rubric_versions())}.")
    path = RUBRICS_DIR / f"{version}.json"
    if not path.is_file():
        raise JudgeError(f"No rubric {version!r}. Known: {', '.join(rubric_versions())}.")
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
        for key in ("version", "overall", "criteria", "judge_instructions", "single_format",
                    "pairwise_instructions", "pairwise_format"):
            data[key]  # noqa: B018 — a KeyError names the missing part
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise JudgeError(f"The rubric file {path.name} is broken ({exc}).") from None
    return Rubric(version=data["version"], data=data, sha256=hashlib.sha256(raw).hexdigest(),
                  text=raw.decode("utf-8"))


# --------------------------------------------------------------------------------------------
# Prompts and the JSON schemas we ask the server to follow
# --------------------------------------------------------------------------------------------

def format_task(instruction: str, input_text: str = "") -> str:
    """The task as the model saw it (the reference book's Alpaca-style layout)."""
    text = f"### Instruction:\n{instruction.strip()}"
    if input_text and input_text.strip():
        text += f"\n\n### Input:\n{input_text.strip()}"
    return text


def single_messages(rubric: Rubric, instruction: str, input_text: str, reference: str,
                    answer: str) -> list[dict]:
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
    user = (f"{format_task(instruction, input_text)}\n\n### Reference answer:\n{reference.strip()}\n\n"
            f"### Response A:\n{answer_a.strip()}\n\n### Response B:\n{answer_b.strip()}\n\n"
            f"{rubric.data['pairwise_format']}")
    return [{"role": "system", "content": rubric.data["pairwise_instructions"]},
            {"role": "user", "content": user}]


def single_schema(rubric: Rubric) -> dict:
    """JSON schema of a single-answer judgement (strict mode: every key required, no extras)."""
    criteria = {c["name"]: {"type": "integer", "minimum": c["min"], "maximum": c["max"]}
                for c in rubric.criteria}
    return {"type": "object", "additionalProperties": False,
            "required": ["criteria", "score", "rationale"],
            "properties": {
                "criteria": {"type": "object", "additionalProperties": False,
                             "required": list(criteria), "properties": criteria},
                "score": {"type": "integer", "minimum": rubric.overall["min"],
                          "maximum": rubric.overall["max"]},
                "rationale": {"type": "string"}}}


PAIRWISE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["winner", "rationale"],
                   "properties": {"winner": {"type": "string", "enum": ["A", "B", "tie"]},
                                  "rationale": {"type": "string"}}}


# --------------------------------------------------------------------------------------------
# Reading replies: structured JSON first, then repairs, never a guess
# --------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_BRACKETED_NUMBER = re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]")
_BARE_NUMBER = re.compile(r"\s*(?:(?:score|rating)\s*[:=]?\s*)?(-?\d+(?:\.\d+)?)\s*(?:/\s*100)?\s*\.?\s*", re.I)


def extract_json_object(text: str) -> tuple[dict, str] | None:
    """The JSON object inside a reply and how it was found, or None.

    Tried in order: the whole reply, a ```json fenced block, the first `{...}` that parses.
    """
    stripped = text.strip()
    try:
        obj = json.loads(stripped)
        if isinstance(obj, dict):
            return obj, "json"
    except (json.JSONDecodeError, ValueError):
        pass
    for match in _FENCE.finditer(text):
        try:
            obj = json.loads(match.group(1).strip())
            if isinstance(obj, dict):
                return obj, "fenced json"
        except (json.JSONDecodeError, ValueError):
            continue
    decoder = json.JSONDecoder()
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except (json.JSONDecodeError, ValueError):
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
        raise ReplyUnreadable(f"{name} is {value!r}, not a number")
    if not low <= number <= high:
        raise ReplyUnreadable(f"{name} {number:g} is outside {low:g}-{high:g}")
    return number


def parse_single_reply(text: str, rubric: Rubric) -> dict:
    """`{"score", "criteria", "rationale", "parse_method"}` from a reply, or ReplyUnreadable.

    Accepted: a JSON object (whole, fenced or embedded in prose), `[[n]]`, or a reply that is
    only a number ("85", "Score: 85", "85/100"). A number somewhere inside prose is *not*
    accepted: "4 of 5 facts are right, 70" could mean either, and guessing would invent a score.
    """
    low, high = rubric.overall["min"], rubric.overall["max"]
    found = extract_json_object(text)
    if found is not None:
        obj, method = found
        if "score" not in obj:
            raise ReplyUnreadable("the JSON object has no \"score\"")
        score = _check_range("score", obj["score"], low, high)
        criteria = {}
        given = obj.get("criteria") or {}
        if not isinstance(given, dict):
            raise ReplyUnreadable("\"criteria\" is not an object")
        for c in rubric.criteria:
            if c["name"] in given:
                criteria[c["name"]] = _check_range(c["name"], given[c["name"]], c["min"], c["max"])
        rationale = obj.get("rationale", "")
        return {"score": score, "criteria": criteria,
                "rationale": str(rationale)[:2000], "parse_method": method}
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
        winner = _VERDICTS.get(str(obj.get("winner", "")).strip().lower())
        if winner is None:
            raise ReplyUnreadable(f"\"winner\" is {obj.get('winner')!r}, not A, B or tie")
        return {"winner": winner, "rationale": str(obj.get("rationale", ""))[:2000], "parse_method": method}
    bracketed = set(m.lower() for m in re.findall(r"\[\[\s*(A|B|C|tie)\s*\]\]", text, re.I))
    if len(bracketed) == 1:
        return {"winner": _VERDICTS[bracketed.pop()], "parse_method": "[[x]]",
                "rationale": re.sub(r"\[\[.*?\]\]", "", text).strip()[:2000]}
    bare = re.fullmatch(r"\s*(?:winner\s*[:=]?\s*)?(A|B|tie)\s*\.?\s*", text, re.I)
    if bare:
        return {"winner": _VERDICTS[bare.group(1).lower()], "rationale": "", "parse_method": "bare verdict"}
    raise ReplyUnreadable("the reply names no winner (A, B or tie)")


# --------------------------------------------------------------------------------------------
# Talking to the endpoint: our own retry policy around the real `openai` client
# --------------------------------------------------------------------------------------------

def make_client(settings: EndpointSettings):
    """An `openai.OpenAI` client with retries switched off: the policy below owns them."""
    import openai  # imported here so that pages can import this module cheaply

    # Local servers ignore the key but the client insists on one; "not-needed" is what their docs use.
    return openai.OpenAI(api_key=settings.api_key or "not-needed", base_url=settings.base_url,
                         timeout=settings.timeout, max_retries=0)


def redact(text: str, secret: str) -> str:
    """`text` with every occurrence of `secret` (and of its last 8+ characters) masked."""
    text = str(text)
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
        if len(secret) >= 12:  # servers echo partially masked keys, e.g. "sk-...wxyz1234"
            text = text.replace(secret[-8:], "***")
    return text


def retry_after_seconds(headers) -> float | None:
    """The wait a 429/503 asks for: `retry-after-ms`, or `retry-after` as seconds or HTTP date."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


def _server_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(getattr(exc, "message", "") or exc)


def _refused(exc) -> bool:
    cause = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def classify_error(exc, settings: EndpointSettings, sent_format: bool) -> tuple[str, str]:
    """(action, message) for an exception from the client.

    action: "fatal" (stop the evaluation), "retry" (transient), "fail" (this judgement only),
    "drop-format" (the server refused `response_format`: ask again without it).
    """
    import openai

    where = redact_url(settings.base_url)
    server_says = redact(_server_message(exc), settings.api_key)[:300]
    if isinstance(exc, openai.APITimeoutError):
        return "retry", f"the judge sent no reply within {settings.timeout:g} s"
    if isinstance(exc, openai.APIConnectionError):
        if _refused(exc):
            return "fatal", (f"Could not connect to the judge at {where}: connection refused. "
                             "Is the server running, and is the port right?")
        return "retry", f"the connection to the judge at {where} failed"
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        # The server's own text is left out on purpose: OpenAI's echoes part of the key.
        return "fatal", (f"The judge at {where} refused the API key ({exc.status_code}"
                         + (", or the key may not use this model" if exc.status_code == 403 else "")
                         + "). Check the key (for a local server any non-empty key will do).")
    if isinstance(exc, openai.NotFoundError):
        return "fatal", (f"The judge at {where} does not know the model {settings.model!r}, or the base URL "
                         f"is wrong (404: {server_says}). Use 'Test connection' to list its models; "
                         "the base URL usually ends in /v1.")
    if isinstance(exc, openai.RateLimitError):
        code = getattr(exc, "code", None) or ""
        if "quota" in str(code) or "quota" in server_says.lower():
            return "fatal", f"The judge account has no quota left (429: {server_says})."
        return "retry", f"rate limited by the judge (429: {server_says})"
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status >= 500:
            return "retry", f"the judge server failed ({status}: {server_says})"
        if status in (400, 422) and sent_format:
            return "drop-format", f"the server refused structured output ({status}: {server_says})"
        return "fail", f"the judge refused the request ({status}: {server_says})"
    return "fail", f"unexpected reply from the judge ({type(exc).__name__}: {redact(str(exc), settings.api_key)[:200]})"


class JudgeCache:
    """One JSON file per judgement, named by a hash of everything that decides the reply.

    The key covers the endpoint URL, the judge model, the rubric's sha256, the sampling settings and
    the exact messages (which hold the answer) — never the API key. Only successful judgements are
    stored: a failure is asked again next time (the server may be fixed by then).
    """

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.checkpoints_dir() / CACHE_DIRNAME

    @staticmethod
    def key(settings: EndpointSettings, rubric: Rubric, kind: str, messages: list[dict]) -> str:
        identity = {"base_url": redact_url(settings.base_url), "model": settings.model,
                    "temperature": settings.temperature, "rubric_sha256": rubric.sha256,
                    "kind": kind, "messages": messages}
        blob = json.dumps(identity, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # missing or torn: ask again

    def put(self, key: str, record: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)  # atomic: a crash leaves the old file or none, never half of one


class Judge:
    """Asks one endpoint for judgements, with retries, repair-parsing and the cache."""

    def __init__(self, settings: EndpointSettings, rubric: Rubric, cache: JudgeCache | None = None,
                 sleep: Callable[[float], None] = time.sleep, client=None):
        self.settings = settings
        self.rubric = rubric
        self.cache = cache if cache is not None else JudgeCache()
        self.sleep = sleep                  # tests pass a recorder to check the waits
        self.client = client or make_client(settings)
        # How we ask for JSON, best first; a server that refuses one form gets the next from then on.
        # json_schema: OpenAI, Ollama, vLLM, LM Studio, llama.cpp's llama-server;
        # json_object + schema: llama-cpp-python's server (it rejects json_schema with a 422).
        self.format_level = 0
        self.requests_sent = 0
        self._lock = threading.Lock()

    FORMATS = ("json_schema", "json_object", "plain prompt")

    @property
    def structured(self) -> bool:
        """Whether the server still gets a response_format (False once it refused both forms)."""
        return self.format_level < 2

    @property
    def output_format(self) -> str:
        return self.FORMATS[self.format_level]

    @staticmethod
    def _response_format(schema_name: str, schema: dict, level: int) -> dict | None:
        if level == 0:
            return {"type": "json_schema", "json_schema": {"name": schema_name, "strict": True, "schema": schema}}
        if level == 1:
            return {"type": "json_object", "schema": schema}
        return None

    # -- one HTTP request, with the transient-error policy -----------------------------------
    def _backoff(self, attempt: int, exc) -> float:
        asked = retry_after_seconds(getattr(getattr(exc, "response", None), "headers", None))
        if asked is not None:
            if asked > self.settings.max_backoff_s:
                raise EndpointUnusable(f"The judge asks us to wait {asked:.0f} s before the next request "
                                       "(rate limit). Try again later or lower the concurrency.")
            return asked
        wait = self.settings.backoff_s * 2 ** (attempt - 1)
        return min(self.settings.max_backoff_s, wait * random.uniform(1.0, 1.25))  # jitter spreads threads

    def chat(self, messages: list[dict], schema_name: str, schema: dict | None) -> str:
        """The text of one chat completion; raises RequestFailed or EndpointUnusable.

        A 400/422 while asking for structured output is tried again with the next, plainer form;
        the server keeps that form only if the request then succeeds (a 400 for another reason,
        such as a prompt longer than the context, must not switch structured output off for good).
        """
        attempt = 0
        level = self.format_level
        while True:
            response_format = self._response_format(schema_name, schema, level) if schema is not None else None
            request = {"model": self.settings.model, "messages": messages,
                       "temperature": self.settings.temperature}
            if self.settings.max_tokens:
                request["max_tokens"] = self.settings.max_tokens
            if response_format is not None:
                request["response_format"] = response_format
            attempt += 1
            with self._lock:
                self.requests_sent += 1
            try:
                completion = self.client.chat.completions.create(**request)
            except Exception as exc:  # noqa: BLE001 — every failure is classified below
                action, message = classify_error(exc, self.settings, response_format is not None)
                if action == "drop-format":
                    level += 1          # the same request in a plainer form; not a retry
                    attempt -= 1
                    continue
                if action == "fatal":
                    raise EndpointUnusable(message) from None
                if action == "retry" and attempt < self.settings.max_attempts:
                    self.sleep(self._backoff(attempt, exc))
                    continue
                if action == "retry":
                    message += f" (gave up after {attempt} tries)"
                raise RequestFailed(message) from None
            if schema is not None:
                with self._lock:        # this form works: use it from now on (threads agree on the max)
                    self.format_level = max(self.format_level, level)
            try:
                return completion.choices[0].message.content or ""
            except (AttributeError, IndexError, TypeError):
                raise RequestFailed("the endpoint's reply is not a chat completion") from None

    # -- one judgement: ask, read, ask again if unreadable -----------------------------------
    def _judge(self, kind: str, messages: list[dict], parse, schema_name: str, schema: dict,
               reminder: str) -> dict:
        key = JudgeCache.key(self.settings, self.rubric, kind, messages)
        hit = self.cache.get(key)
        if hit is not None and hit.get("status") == "ok":
            return {**hit, "cached": True}
        conversation, replies, reason = list(messages), [], ""
        for attempt in range(1, self.settings.parse_attempts + 1):
            try:
                reply = self.chat(conversation, schema_name, schema)
            except RequestFailed as exc:
                return {"status": "failed", "error": str(exc), "raw_reply": replies[-1] if replies else None,
                        "attempts": attempt, "cached": False}
            replies.append(reply)
            try:
                parsed = parse(reply)
            except ReplyUnreadable as exc:
                reason = str(exc)
                # Show the judge its own reply and why it failed: cheaper than a blind retry at temperature 0.
                conversation = list(messages) + [
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": f"That reply could not be used: {reason}. {reminder}"}]
                continue
            result = {"status": "ok", **parsed, "raw_reply": reply, "attempts": attempt,
                      "rubric_version": self.rubric.version, "rubric_sha256": self.rubric.sha256,
                      "judge_model": self.settings.model}
            self.cache.put(key, result)
            return {**result, "cached": False}
        return {"status": "failed", "error": f"unreadable reply after {len(replies)} tries: {reason}",
                "raw_reply": replies[-1] if replies else None, "raw_replies": replies,
                "attempts": len(replies), "cached": False}

    def grade(self, instruction: str, input_text: str, reference: str, answer: str) -> dict:
        """Single-answer grading: score 0-100, 1-5 per criterion, a rationale."""
        messages = single_messages(self.rubric, instruction, input_text, reference, answer)
        return self._judge("single", messages, lambda t: parse_single_reply(t, self.rubric),
                           "judgement", single_schema(self.rubric), self.rubric.data["single_format"])

    def compare(self, instruction: str, input_text: str, reference: str, answer_a: str, answer_b: str) -> dict:
        """One order of a pairwise comparison: winner A, B or tie."""
        messages = pairwise_messages(self.rubric, instruction, input_text, reference, answer_a, answer_b)
        return self._judge("pairwise", messages, parse_pairwise_reply, "comparison", PAIRWISE_SCHEMA,
                           self.rubric.data["pairwise_format"])


def test_connection(settings: EndpointSettings) -> dict:
    """Ask the endpoint what it serves (or send one tiny request) and report what we saw.

    Returns `{"ok", "message", "models", "model_listed", "reply", "seconds"}`; never raises for
    endpoint trouble — the message says what went wrong.
    """
    started = time.perf_counter()
    client = make_client(settings)
    report = {"ok": False, "models": [], "model_listed": None, "reply": None}

    def done(ok: bool, message: str) -> dict:
        report.update(ok=ok, message=redact(message, settings.api_key),
                      seconds=round(time.perf_counter() - started, 3))
        return report

    try:
        report["models"] = sorted(m.id for m in client.models.list())[:200]
        report["model_listed"] = settings.model in report["models"]
    except Exception as exc:  # noqa: BLE001
        action, message = classify_error(exc, settings, sent_format=False)
        if action == "fatal" and "404" not in message:
            return done(False, message)
        # Some servers do not list models: fall through to one tiny request.
    if report["model_listed"]:
        return done(True, f"Connected. The endpoint serves {len(report['models'])} model(s), "
                          f"including {settings.model!r}.")
    try:
        completion = client.chat.completions.create(
            model=settings.model, messages=[{"role": "user", "content": "Reply with the word OK."}],
            temperature=0, max_tokens=5)
        report["reply"] = (completion.choices[0].message.content or "")[:200]
    except Exception as exc:  # noqa: BLE001
        return done(False, classify_error(exc, settings, sent_format=False)[1])
    listed = (f" It lists {len(report['models'])} model(s), not including {settings.model!r}, "
              "but answered anyway." if report["models"] else "")
    return done(True, f"Connected. The model replied {report['reply']!r}.{listed}")


# --------------------------------------------------------------------------------------------
# What to judge: a stage-6 run's responses, or a registry data set
# --------------------------------------------------------------------------------------------

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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"Cannot read {origin} ({path.name}): {exc}") from None


def load_items(run: str | None = None, data: str | None = None) -> tuple[list[EvalItem], list[str]]:
    """The items to judge and the answer labels, from a stage-6 run or a registry data set."""
    if bool(run) == bool(data):
        raise JudgeError("Judge either a stage-6 run (--run) or a data set (--data), not both or neither.")
    if run:
        from core.lab import runs
        path = runs.run_dir(run) / "responses.json"
        if not path.is_file():
            raise DataError(f"Run {run!r} has no responses.json: judge an instruction-tuned (stage 6) run "
                            "that has finished generating its test answers.")
        answer_keys = RUN_ANSWER_KEYS
        records = _read_json_file(path, f"responses.json of run {run!r}")
        origin = f"responses.json of run {run!r}"
    else:
        if data not in DATA_ANSWER_KEYS:
            raise DataError(f"The data set {data!r} holds no model answers. Choose one of: "
                            f"{', '.join(DATA_ANSWER_KEYS)}, or a stage-6 run.")
        from core.lab import data as data_registry
        answer_keys = DATA_ANSWER_KEYS[data]
        records = _read_json_file(data_registry.locate(data), data)
        origin = data
    return items_from_records(records, answer_keys, origin), [label for label, _ in answer_keys]


# --------------------------------------------------------------------------------------------
# Reference overlap and statistics
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
    """Percentile bootstrap interval of the mean (seeded, so the same scores give the same interval)."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=(resamples, values.size))  # (R, n) indices
    means = values[picks].mean(axis=1)                                   # (R,)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
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


def summarize(records: list[dict], labels: list[str]) -> dict:
    """Per-model means with intervals, ROUGE-L, failures, and the pairwise win/tie/loss rates."""
    models = {}
    for label in labels:
        singles = [r for r in records if r["kind"] == "single" and r["model"] == label]
        ok = [r for r in singles if r["status"] == "ok"]
        scores = [r["score"] for r in ok]
        rouge = [r["rouge_l"] for r in singles]
        criteria = {}
        for r in ok:
            for name, value in (r.get("criteria") or {}).items():
                criteria.setdefault(name, []).append(value)
        correlation = None
        if len(ok) >= 3 and np.std(scores) > 0 and np.std([r["rouge_l"] for r in ok]) > 0:
            correlation = round(float(np.corrcoef(scores, [r["rouge_l"] for r in ok])[0, 1]), 3)
        models[label] = {
            "judged": len(singles), "scored": len(ok), "failed": len(singles) - len(ok),
            "mean_score": round(float(np.mean(scores)), 3) if scores else None,
            "ci95": bootstrap_ci(scores),
            "rouge_l": round(float(np.mean(rouge)), 4) if rouge else None,
            "rouge_judge_correlation": correlation,
            "criteria": {k: round(float(np.mean(v)), 3) for k, v in criteria.items()},
        }
    pairs = [r for r in records if r["kind"] == "pairwise"]
    pairwise = None
    if pairs:
        first, second = pairs[0]["first"], pairs[0]["second"]
        counted = [r for r in pairs if r["outcome"] != "failed"]
        wins = sum(r["outcome"] == second for r in counted)
        losses = sum(r["outcome"] == first for r in counted)
        inconsistent = sum(r["outcome"] == "inconsistent" for r in counted)
        ties = len(counted) - wins - losses   # agreed ties plus inconsistent pairs
        n = len(counted)
        pairwise = {"first": first, "second": second, "compared": n, "wins": wins, "ties": ties,
                    "losses": losses, "inconsistent": inconsistent, "failed": len(pairs) - n,
                    "win_rate": round(wins / n, 4) if n else None,
                    "tie_rate": round(ties / n, 4) if n else None,
                    "loss_rate": round(losses / n, 4) if n else None}
    headline = labels[-1]
    failed = sum(r["status"] != "ok" for r in records)
    return {"n": len({r["item"] for r in records}), "judgements": len(records), "headline_model": headline,
            "mean_score": models[headline]["mean_score"] if models else None,
            "ci95": models[headline]["ci95"] if models else None,
            "failed": failed, "cached": sum(bool(r.get("cached")) for r in records),
            "pairwise_win_rate": pairwise["win_rate"] if pairwise else None,
            "models": models, "pairwise": pairwise}


# --------------------------------------------------------------------------------------------
# A whole evaluation
# --------------------------------------------------------------------------------------------

def plan_tasks(items: list[EvalItem], labels: list[str], mode: str) -> list[tuple]:
    """The judgements to make: ("single", item, label) and ("pairwise", item) work units."""
    if mode not in ("single", "pairwise", "both"):
        raise JudgeError(f"Mode must be single, pairwise or both, not {mode!r}.")
    if mode == "pairwise" and len(labels) < 2:
        raise JudgeError("Pairwise judging needs two answers per instruction (a stage-6 run or "
                         "eval-example-data); this data set has one.")
    tasks = []
    for item in items:
        if mode in ("single", "both"):
            tasks += [("single", item, label) for label in labels]
        if mode in ("pairwise", "both") and len(labels) >= 2:
            tasks.append(("pairwise", item))
    return tasks


def run_task(judge: Judge, task: tuple, labels: list[str]) -> dict:
    """Carry out one work unit and return the record written to judgements.jsonl."""
    item = task[1]
    base = {"item": item.index, "instruction": item.instruction, "input": item.input,
            "reference": item.reference}
    if task[0] == "single":
        label = task[2]
        answer = item.answers[label]
        result = judge.grade(item.instruction, item.input, item.reference, answer)
        return {**base, "kind": "single", "model": label, "answer": answer,
                "rouge_l": round(rouge_l(answer, item.reference), 4),
                "score": result.get("score"), **{k: v for k, v in result.items() if k != "score"}}
    first, second = labels[0], labels[1]
    ab = judge.compare(item.instruction, item.input, item.reference, item.answers[first], item.answers[second])
    ba = judge.compare(item.instruction, item.input, item.reference, item.answers[second], item.answers[first])
    outcome = pairwise_outcome(first, second, ab, ba)
    errors = [r["error"] for r in (ab, ba) if r.get("status") != "ok"]
    return {**base, "kind": "pairwise", "first": first, "second": second,
            "answer_first": item.answers[first], "answer_second": item.answers[second],
            "status": "failed" if outcome == "failed" else "ok", "outcome": outcome,
            "winner_ab": ab.get("winner"), "winner_ba": ba.get("winner"),
            "rationale_ab": ab.get("rationale"), "rationale_ba": ba.get("rationale"),
            "raw_reply_ab": ab.get("raw_reply"), "raw_reply_ba": ba.get("raw_reply"),
            "error": "; ".join(errors) or None, "cached": bool(ab.get("cached") and ba.get("cached")),
            "rubric_version": judge.rubric.version, "rubric_sha256": judge.rubric.sha256,
            "judge_model": judge.settings.model}


def evaluate(judge: Judge, items: list[EvalItem], labels: list[str], mode: str = "both",
             on_record: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> tuple[list[dict], bool]:
    """Run every judgement with up to `max_concurrency` in flight; returns (records, stopped).

    Records come back in a stable order (by item, then kind and model) whatever order the
    requests finished in. An `EndpointUnusable` stops everything and is raised after the
    finished records have been handed to `on_record` (they are also in the cache).
    """
    tasks = plan_tasks(items, labels, mode)
    records, stopped, fatal = [], False, None
    with concurrent.futures.ThreadPoolExecutor(max_workers=judge.settings.max_concurrency) as pool:
        futures = [pool.submit(run_task, judge, task, labels) for task in tasks]
        for future in concurrent.futures.as_completed(futures):
            try:
                record = future.result()
            except concurrent.futures.CancelledError:
                continue
            except EndpointUnusable as exc:
                fatal = fatal or exc
                for f in futures:
                    f.cancel()
                continue
            records.append(record)
            if on_record:
                on_record(record)
            if not stopped and should_stop and should_stop():
                stopped = True
                for f in futures:
                    f.cancel()   # requests already in flight finish and are kept
    if fatal is not None:
        raise fatal
    records.sort(key=lambda r: (r["item"], r["kind"], labels.index(r["model"]) if "model" in r else 0))
    return records, stopped


# --------------------------------------------------------------------------------------------
# A judge run in the run store (what `python -m core judge` and the page's job do)
# --------------------------------------------------------------------------------------------

JUDGEMENTS_FILE = "judgements.jsonl"   # one record per judgement, appended as they finish
SUMMARY_FILE = "summary.json"          # the aggregates, written at the end (also after a stop)
_RESUME_KEYS = ("source_run", "data", "mode", "limit", "rubric", "judge_model", "judge_base_url")


def judge_run(run_id: str, settings: EndpointSettings, source_run: str | None = None,
              data: str | None = None, mode: str = "both", limit: int | None = None,
              rubric_version: str = DEFAULT_RUBRIC, resume: bool = False,
              progress: Callable[[str], None] | None = None, cache: JudgeCache | None = None,
              sleep: Callable[[float], None] = time.sleep) -> dict:
    """Judge a stage-6 run's answers (or a data set's) into run `run_id`; returns the headline dict.

    Resuming replays the finished judgements from the cache (no requests) and asks the rest.
    """
    from core.lab import runs

    started = time.perf_counter()
    rubric = load_rubric(rubric_version)
    if limit is not None and limit < 1:
        raise JudgeError("--limit must be at least 1.")
    items, labels = load_items(source_run, data)
    items = items[:limit] if limit else items
    if mode == "both" and len(labels) < 2:
        mode = "single"  # one answer per instruction: there is nothing to compare it with
    total = len(plan_tasks(items, labels, mode))
    config = {"source_run": source_run, "data": data, "mode": mode, "limit": limit, "labels": labels,
              "items": len(items), "total": total,
              "rubric": {"version": rubric.version, "sha256": rubric.sha256},
              "judge_model": settings.model, "judge_base_url": redact_url(settings.base_url),
              "judge": settings.public()}
    run = runs.create_run(run_id, "judge", config, parent=source_run, resume=resume)
    if resume:
        changed = [k for k in _RESUME_KEYS if run.config.get(k) != config[k]]
        if run.stage != "judge" or changed:
            raise JudgeError(f"Run {run_id!r} was started with other settings ({', '.join(changed) or 'stage'}); "
                             "resume it with the same ones, or start a new run id.")
    path = run.path / JUDGEMENTS_FILE
    runs.write_bytes_atomic(path, b"")  # a resume rebuilds the file; finished ones come from the cache

    judge = Judge(settings, rubric, cache=cache, sleep=sleep)
    done: list[dict] = []
    last_report = [0.0]

    def on_record(record: dict) -> None:
        done.append(record)
        runs.append_jsonl(path, record)
        now = time.perf_counter()
        if now - last_report[0] > 1.0 or len(done) == total:
            last_report[0] = now
            failed = sum(r["status"] != "ok" for r in done)
            cached = sum(bool(r.get("cached")) for r in done)
            message = f"Judged {len(done)}/{total} ({cached} from the cache, {failed} failed)"
            if progress:
                progress(message)
            # Progress only: the state stays as it is (running, or stopping if Stop was pressed).
            runs.write_status(run_id, None, message=message, done=len(done), total=total)

    def finish(records: list[dict], stopped: bool, error: str | None) -> dict:
        summary = summarize(records, labels) if records else {
            "n": 0, "judgements": 0, "mean_score": None, "ci95": None, "failed": 0, "cached": 0,
            "pairwise_win_rate": None, "models": {}, "pairwise": None}
        summary.update(run_id=run_id, mode=mode, labels=labels, total=total,
                       complete=not stopped and error is None and len(records) == total,
                       stopped=stopped, error=error, requests=judge.requests_sent,
                       structured_output=judge.output_format,
                       rubric={"version": rubric.version, "sha256": rubric.sha256},
                       judge=settings.public(), seconds=round(time.perf_counter() - started, 2))
        runs.write_json_atomic(run.path / SUMMARY_FILE, summary)
        return summary

    try:
        records, stopped = evaluate(judge, items, labels, mode, on_record=on_record,
                                    should_stop=lambda: runs.stop_requested(run_id))
    except EndpointUnusable as exc:
        finish(done, stopped=False, error=str(exc))
        raise
    # Rewrite in a stable order (by item) now that everything is in.
    runs.write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    summary = finish(records, stopped, None)
    if not stopped and runs.read_status(run_id).get("state") in ("reserved", "running"):
        runs.write_status(run_id, "finished", message="Finished.", done=len(records), total=total)
    headline = {k: summary[k] for k in ("run_id", "n", "mean_score", "ci95", "failed", "pairwise_win_rate",
                                        "cached", "requests", "judgements", "headline_model", "stopped",
                                        "seconds")}
    headline["mean_scores"] = {label: m["mean_score"] for label, m in summary["models"].items()}
    headline["rouge_l"] = {label: m["rouge_l"] for label, m in summary["models"].items()}
    return headline


def read_judgements(run_id: str) -> list[dict]:
    from core.lab import runs
    return runs.read_jsonl(runs.run_dir(run_id) / JUDGEMENTS_FILE)


def read_summary(run_id: str) -> dict | None:
    from core.lab import runs
    path = runs.run_dir(run_id) / SUMMARY_FILE
    return runs.read_json(path) if path.is_file() else None
