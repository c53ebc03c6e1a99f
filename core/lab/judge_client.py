"""The judge's machinery: talking to an OpenAI-compatible endpoint over an unreliable network.

The lesson (rubric, prompts, parsing, statistics) is in `core/gpt/judge.py`; this module owns the
policy around it:

- `EndpointSettings`: where the judge lives; the API key is kept out of `repr` and of everything
  written (`public()`);
- the real `openai` client, with its own retries off, redirects not followed, and every request
  checked against the server's settings (`core.lab.judge_settings`: allowed hosts and endpoints);
- retries with backoff (honouring `Retry-After`), error classification, a give-up clock;
- **format negotiation**: `json_schema` first, then `json_object` with the schema (also spelled
  out in the prompt), then a plain prompt with repair-parsing. Real servers refuse a format in
  different ways (OpenAI and vLLM: 400; llama-cpp-python: a 500 whose body is a validation error
  naming `response_format.type`). The first judgement of a run probes alone, and what worked is
  remembered per endpoint (in the cache folder) for the next runs;
- an on-disk cache, so a rerun or a resumed evaluation sends no request twice;
- a thread pool that stops after N failures in a row, keeping what it finished.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import json
import math
import random
import re
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from core.gpt import judge as J
from core.lab import judge_settings, paths, runs
from core.lab.errors import JudgeError
from core.lab.judge_data import EvalItem
from core.lab.judge_settings import EndpointRefused, redact_url

CACHE_DIRNAME = ".judge-cache"
FORMATS_FILE = "formats.json"


class EndpointUnusable(JudgeError):
    """The endpoint cannot be used at all (bad key, unknown model, nothing listening): stop."""


class TooManyFailures(EndpointUnusable):
    """N judgements failed in a row: the run stops, keeping what it finished."""


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
        parts = urlsplit(self.base_url)
        if "@" in parts.netloc:
            raise JudgeError("Put the password or key in the API key field, not in the base URL "
                             "(a URL is stored with the run; the key never is).")
        if parts.query or parts.fragment or "?" in self.base_url:
            raise JudgeError(f"The judge base URL must not carry a query string ({redact_url(self.base_url)}): "
                             "put a key in the API key field (a URL is stored with the run; the key never is).")
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
# The HTTP client: no redirects, every connection checked against the server's settings
# --------------------------------------------------------------------------------------------

def _guards(base_url: str):
    """httpx event hooks: refuse a host before the request, and check the address connected to."""
    def before(request) -> None:
        host, port = request.url.host, request.url.port or (443 if request.url.scheme == "https" else 80)
        judge_settings.check_address(base_url, judge_settings._addresses(host, port))

    def after(response) -> None:
        url = response.request.url
        if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.host):
            return  # connected to a proxy, not to the judge: its address says nothing (checked by name)
        stream = response.extensions.get("network_stream")
        peer = stream.get_extra_info("server_addr") if stream is not None else None
        if peer:
            judge_settings.check_address(base_url, [str(peer[0])])

    return {"request": [before], "response": [after]}


def make_client(settings: EndpointSettings):
    """An `openai.OpenAI` client with retries off (the policy below owns them), redirects not
    followed, and the host checked on every request."""
    import openai  # heavy (~0.5 s): pages import this module, only a request needs the client

    http = openai.DefaultHttpxClient(follow_redirects=False, timeout=settings.timeout,
                                     event_hooks=_guards(settings.base_url))
    # Local servers ignore the key but the client insists on one; "not-needed" is what their docs use.
    return openai.OpenAI(api_key=settings.api_key or "not-needed", base_url=settings.base_url,
                         timeout=settings.timeout, max_retries=0, http_client=http)


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
    """The server's own words about an error, on one line."""
    body = getattr(exc, "body", None)
    text = str(getattr(exc, "message", "") or exc)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            text = str(inner["message"])
        elif isinstance(inner, str):
            text = inner
    return " ".join(text.split())


def _refused(exc) -> bool:
    cause = exc
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
            return True
        cause = cause.__cause__ or cause.__context__
    return False


# A server refusing `response_format` says so in its error text (llama-cpp-python: HTTP 500,
# "... ('body', 'response_format', 'type') ... Input should be 'text' or 'json_object'").
_FORMAT_WORDS = re.compile(r"response_format|json_schema|json_object|structured output|grammar", re.I)


def _status_action(exc, status: int, server_says: str, where: str, sent_format: bool) -> tuple[str, str]:
    if 300 <= status < 400:
        location = redact_url(exc.response.headers.get("location", "?")) if getattr(exc, "response", None) else "?"
        return "fatal", (f"The judge at {where} answered with a redirect ({status} to {location}); redirects "
                         "are not followed: use the address it points to as the base URL.")
    if sent_format and (status in (400, 422) or (status >= 500 and _FORMAT_WORDS.search(server_says))):
        return "drop-format", f"the server refused structured output ({status}: {server_says})"
    if status >= 500:
        return "retry", f"the judge server failed ({status}: {server_says})"
    return "fail", f"the judge refused the request ({status}: {server_says})"


def classify_error(exc, settings: EndpointSettings, sent_format: bool) -> tuple[str, str]:
    """(action, message) for an exception from the client.

    action: "fatal" (stop the evaluation), "retry" (transient), "fail" (this judgement only),
    "drop-format" (the server refused `response_format`: ask again in the next, plainer form).
    """
    import openai  # heavy: see make_client

    where = redact_url(settings.base_url)
    server_says = redact(_server_message(exc), settings.api_key)[:300]
    if isinstance(exc, EndpointRefused):
        return "fatal", str(exc)
    if isinstance(exc, RecursionError):
        return "fail", "the judge's reply nests too deeply to be read"
    if isinstance(exc, openai.APITimeoutError):
        return "retry", f"the judge sent no reply within {settings.timeout:g} s"
    if isinstance(exc, openai.APIConnectionError):
        if isinstance(exc.__cause__, EndpointRefused):
            return "fatal", str(exc.__cause__)
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
        return "fatal", (f"The judge at {where} does not know the model {settings.model[:80]!r}, or the base "
                         f"URL is wrong (404: {server_says}). Use 'Test connection' to list its models; "
                         "the base URL usually ends in /v1.")
    if isinstance(exc, openai.RateLimitError):
        code = getattr(exc, "code", None) or ""
        if "quota" in str(code) or "quota" in server_says.lower():
            return "fatal", f"The judge account has no quota left (429: {server_says})."
        return "retry", f"rate limited by the judge (429: {server_says})"
    if isinstance(exc, openai.APIStatusError):
        return _status_action(exc, exc.status_code, server_says, where, sent_format)
    return "fail", (f"unexpected reply from the judge ({type(exc).__name__}: "
                    f"{' '.join(redact(str(exc), settings.api_key).split())[:200]})")


# --------------------------------------------------------------------------------------------
# The cache, and what each endpoint accepts
# --------------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None  # missing or torn: ask again


class JudgeCache:
    """One JSON file per judgement, named by a hash of everything that decides the reply.

    The key covers the endpoint URL, the judge model, the rubric's sha256, the sampling settings and
    the exact messages (which hold the answer) — never the API key. Only successful judgements are
    stored: a failure is asked again next time (the server may be fixed by then).
    """

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.checkpoints_dir() / CACHE_DIRNAME

    @staticmethod
    def key(settings: EndpointSettings, rubric: J.Rubric, kind: str, messages: list[dict]) -> str:
        identity = {"base_url": redact_url(settings.base_url), "model": settings.model,
                    "temperature": settings.temperature, "rubric_sha256": rubric.sha256,
                    "kind": kind, "messages": messages}
        blob = json.dumps(identity, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        found = _read_json(self._path(key))
        return found if isinstance(found, dict) else None

    def put(self, key: str, record: dict) -> None:
        runs.write_json_atomic(self._path(key), record)  # a crash leaves the old file or none

    # -- which structured-output form each endpoint accepted (probed once, then remembered) --
    def _endpoint_key(self, settings: EndpointSettings) -> str:
        return f"{redact_url(settings.base_url)} {settings.model}"

    def known_format(self, settings: EndpointSettings) -> int | None:
        found = _read_json(self.root / FORMATS_FILE)
        level = found.get(self._endpoint_key(settings)) if isinstance(found, dict) else None
        return level if isinstance(level, int) and 0 <= level < len(Judge.FORMATS) else None

    def remember_format(self, settings: EndpointSettings, level: int) -> None:
        found = _read_json(self.root / FORMATS_FILE)
        found = found if isinstance(found, dict) else {}
        found[self._endpoint_key(settings)] = level
        runs.write_json_atomic(self.root / FORMATS_FILE, found)


# --------------------------------------------------------------------------------------------
# One judge: requests with retries, format negotiation, repair-parsing and the cache
# --------------------------------------------------------------------------------------------

class Judge:
    """Asks one endpoint for judgements, with retries, repair-parsing and the cache."""

    FORMATS = ("json_schema", "json_object", "plain prompt")

    def __init__(self, settings: EndpointSettings, rubric: J.Rubric, cache: JudgeCache | None = None,
                 sleep: Callable[[float], None] = time.sleep, client=None,
                 clock: Callable[[], float] = time.monotonic, give_up_s: float | None = None):
        self.settings = settings
        self.rubric = rubric
        self.cache = cache if cache is not None else JudgeCache()
        self.sleep = sleep                  # tests pass a recorder to check the waits
        self.clock = clock
        self.give_up_s = give_up_s if give_up_s is not None else judge_settings.current().give_up_s
        self.client = client or make_client(settings)
        known = self.cache.known_format(settings)
        self.format_known = known is not None
        self.format_level = known or 0      # best form first; a refused form is never asked again
        self.requests_sent = 0
        self.last_answer = clock()
        self._lock = threading.Lock()

    @property
    def structured(self) -> bool:
        """Whether the server still gets a response_format (False once it refused both forms)."""
        return self.format_level < 2

    @property
    def output_format(self) -> str:
        return self.FORMATS[self.format_level]

    @staticmethod
    def _request_form(messages: list[dict], schema_name: str, schema: dict | None, level: int):
        """(messages, response_format) for one form: json_schema, json_object + schema, plain."""
        if schema is None:
            return messages, None
        if level == 0:
            return messages, {"type": "json_schema", "json_schema": {"name": schema_name, "strict": True,
                                                                     "schema": schema}}
        prompted = J.with_schema_in_prompt(messages, schema)
        return prompted, ({"type": "json_object", "schema": schema} if level == 1 else None)

    def _backoff(self, attempt: int, exc) -> float:
        asked = retry_after_seconds(getattr(getattr(exc, "response", None), "headers", None))
        if asked is not None:
            if asked > self.settings.max_backoff_s:
                raise EndpointUnusable(f"The judge asks us to wait {asked:.0f} s before the next request "
                                       "(rate limit). Try again later or lower the concurrency.")
            return asked
        wait = self.settings.backoff_s * 2 ** (attempt - 1)
        return min(self.settings.max_backoff_s, wait * random.uniform(1.0, 1.25))  # jitter spreads threads

    def _check_give_up(self) -> None:
        silent = self.clock() - self.last_answer
        if silent > self.give_up_s:
            raise EndpointUnusable(
                f"The judge at {redact_url(self.settings.base_url)} has not answered for {silent:.0f} s "
                f"(the limit is {self.give_up_s:g} s, {judge_settings.GIVE_UP_ENV}): giving up on this run. "
                "What was judged is kept; resume when the judge is back.")

    def _send(self, messages, response_format):
        request = {"model": self.settings.model, "messages": messages, "temperature": self.settings.temperature}
        if self.settings.max_tokens:
            request["max_tokens"] = self.settings.max_tokens
        if response_format is not None:
            request["response_format"] = response_format
        with self._lock:
            self.requests_sent += 1
        return self.client.chat.completions.create(**request)

    def chat(self, messages: list[dict], schema_name: str, schema: dict | None) -> str:
        """The text of one chat completion; raises RequestFailed or EndpointUnusable.

        A refusal of the structured-output form is tried again at once in the next, plainer form;
        that form is kept only if the request then succeeds (a 400 for another reason, such as a
        prompt longer than the context, must not switch structured output off for good).
        """
        attempt, level = 0, self.format_level
        while True:
            self._check_give_up()
            sent, response_format = self._request_form(messages, schema_name, schema, level)
            attempt += 1
            try:
                completion = self._send(sent, response_format)
            except Exception as exc:  # noqa: BLE001 — every failure is classified below
                action, message = classify_error(exc, self.settings, response_format is not None)
                if action == "drop-format" and level < len(self.FORMATS) - 1:
                    level, attempt = level + 1, attempt - 1   # the same request, plainer; not a retry
                    continue
                if action == "fatal":
                    raise EndpointUnusable(message) from None
                if action == "retry" and attempt < self.settings.max_attempts:
                    self.sleep(self._backoff(attempt, exc))
                    continue
                if action == "retry":
                    message += f" (gave up after {attempt} tries)"
                raise RequestFailed(message) from None
            self._answered(schema is not None, level)
            try:
                return completion.choices[0].message.content or ""
            except (AttributeError, IndexError, TypeError):
                raise RequestFailed("the endpoint's reply is not a chat completion") from None

    def _answered(self, structured: bool, level: int) -> None:
        """A reply came: reset the give-up clock; a form that worked is used from now on."""
        with self._lock:
            self.last_answer = self.clock()
            if not structured:
                return
            changed = level > self.format_level or not self.format_known
            self.format_level = max(self.format_level, level)  # threads agree on the plainest
            self.format_known = True
        if changed:
            self.cache.remember_format(self.settings, self.format_level)

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
            replies.append(reply[:J.MAX_REPLY_CHARS])
            try:
                parsed = parse(reply)
            except J.ReplyUnreadable as exc:
                reason = str(exc)
                conversation = J.repair_messages(messages, reply, reason, reminder)
                continue
            result = {"status": "ok", **parsed, "raw_reply": replies[-1], "attempts": attempt,
                      "rubric_version": self.rubric.version, "rubric_sha256": self.rubric.sha256,
                      "judge_model": self.settings.model}
            self.cache.put(key, result)
            return {**result, "cached": False}
        return {"status": "failed", "error": f"unreadable reply after {len(replies)} tries: {reason}",
                "raw_reply": replies[-1] if replies else None, "raw_replies": replies,
                "attempts": len(replies), "cached": False}

    def grade(self, instruction: str, input_text: str, reference: str, answer: str) -> dict:
        """Single-answer grading: score 0-100, 1-5 per criterion, a rationale."""
        messages = J.single_messages(self.rubric, instruction, input_text, reference, answer)
        return self._judge("single", messages, lambda t: J.parse_single_reply(t, self.rubric),
                           "judgement", J.single_schema(self.rubric), self.rubric.data["single_format"])

    def compare(self, instruction: str, input_text: str, reference: str, answer_a: str, answer_b: str) -> dict:
        """One order of a pairwise comparison: winner A, B or tie."""
        messages = J.pairwise_messages(self.rubric, instruction, input_text, reference, answer_a, answer_b)
        return self._judge("pairwise", messages, J.parse_pairwise_reply, "comparison", J.PAIRWISE_SCHEMA,
                           self.rubric.data["pairwise_format"])


def test_connection(settings: EndpointSettings) -> dict:
    """Ask the endpoint what it serves (or send one tiny request) and report what we saw.

    Returns `{"ok", "message", "models", "model_listed", "reply", "seconds"}`; never raises for
    endpoint trouble — the message says what went wrong.
    """
    started = time.perf_counter()
    report = {"ok": False, "models": [], "model_listed": None, "reply": None}

    def done(ok: bool, message: str) -> dict:
        report.update(ok=ok, message=redact(message, settings.api_key),
                      seconds=round(time.perf_counter() - started, 3))
        return report

    try:
        judge_settings.check_base_url(settings.base_url)
    except EndpointRefused as exc:
        return done(False, str(exc))
    client = make_client(settings)
    try:
        report["models"] = sorted(str(m.id)[:200] for m in client.models.list())[:200]
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
# A whole evaluation: the work units, a thread pool, a stop after N failures in a row
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
                "rouge_l": round(J.rouge_l(answer, item.reference), 4),
                "score": result.get("score"), **{k: v for k, v in result.items() if k != "score"}}
    first, second = labels[0], labels[1]
    ab = judge.compare(item.instruction, item.input, item.reference, item.answers[first], item.answers[second])
    ba = judge.compare(item.instruction, item.input, item.reference, item.answers[second], item.answers[first])
    outcome = J.pairwise_outcome(first, second, ab, ba)
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


def main_reason(records: list[dict]) -> str | None:
    """The most frequent error among failed records (what to tell the learner)."""
    errors = [r["error"] for r in records if r.get("status") != "ok" and r.get("error")]
    return Counter(errors).most_common(1)[0][0] if errors else None


class _Streak:
    """Counts failed records in a row (in the order they finish)."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def add(self, record: dict) -> TooManyFailures | None:
        self.count = self.count + 1 if record.get("status") != "ok" else 0
        if self.count < self.limit:
            return None
        return TooManyFailures(f"Stopped after {self.count} judgements failed in a row "
                               f"(the limit is {self.limit}, {judge_settings.MAX_FAILURES_ENV}); the last: "
                               f"{record.get('error')}. What was judged is kept; resume when the judge works.")


def evaluate(judge: Judge, items: list[EvalItem], labels: list[str], mode: str = "both",
             on_record: Callable[[dict], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             max_failures: int | None = None) -> tuple[list[dict], bool]:
    """Run every judgement with up to `max_concurrency` in flight; returns (records, stopped).

    When the endpoint's structured-output form is not known yet, the first judgement runs alone
    (the probe), so parallel requests do not all meet the same refusal. Records come back in a
    stable order (by item, then kind and model). An `EndpointUnusable` (or N failures in a row:
    `TooManyFailures`) stops everything and is raised after the finished records were handed to
    `on_record` (they are also in the cache).
    """
    tasks = plan_tasks(items, labels, mode)
    streak = _Streak(max_failures or judge_settings.current().max_failures)
    records, stopped, fatal = [], False, None

    def take(record: dict) -> bool:
        """Keep a record; True when the evaluation must end (a stop request or a failure streak)."""
        nonlocal stopped, fatal
        records.append(record)
        if on_record:
            on_record(record)
        fatal = fatal or streak.add(record)
        if not stopped and should_stop and should_stop():
            stopped = True
        return stopped or fatal is not None

    if tasks and not judge.format_known:   # the probe: one judgement alone
        probe, tasks = tasks[0], tasks[1:]
        if take(run_task(judge, probe, labels)):
            tasks = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=judge.settings.max_concurrency) as pool:
        futures = [pool.submit(run_task, judge, task, labels) for task in tasks]
        for future in concurrent.futures.as_completed(futures):
            try:
                record = future.result()
            except concurrent.futures.CancelledError:
                continue
            except EndpointUnusable as exc:
                fatal = fatal or exc
                record = None
            if record is None or take(record):
                for f in futures:
                    f.cancel()   # requests already in flight finish and are kept
    if fatal is not None:
        raise fatal
    records.sort(key=lambda r: (r["item"], r["kind"], labels.index(r["model"]) if "model" in r else 0))
    return records, stopped
