"""Stage 7: an LLM judge scores the answers of stage 6 (or a data set) against a frozen rubric.

    OPENAI_API_KEY=... python -m core judge --run my-instruct \
        --base-url http://localhost:11434/v1 --model llama3.2 --run-id my-judge [--resume]
    python -m core judge --data eval-example-data --base-url URL --model NAME --limit 20 --run-id ID

The key comes only from the environment, never from the command line, where it would land in
shell history and process lists: `GLASSBOX_JUDGE_API_KEY` (a key for this run), else
`OPENAI_API_KEY` (only to the URL `GLASSBOX_JUDGE_KEY_URL` pins it to, when that is set; see
core/lab/judge_settings.py). Results go into `checkpoints/<run-id>/judgements.jsonl` and
`summary.json`; the JSON last line holds n, mean_score, ci95, failed, pairwise_win_rate and cached
(judgements answered from the cache). A run whose judgements ALL failed exits non-zero with the
judge's reason, as does one that stopped after N failures in a row.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Callable

from core.gpt import judge as J
from core.gpt.errors import GlassBoxError  # noqa: F401 — the page catches it from here
from core.lab import jobs, judge_settings, runs
from core.lab.cli import option
from core.lab.errors import JudgeError
from core.lab.judge_client import (PRESETS, EndpointSettings, EndpointUnusable, Judge, JudgeCache,  # noqa: F401
                                   evaluate, main_reason, plan_tasks, test_connection)
from core.lab.judge_data import (DATA_ANSWER_KEYS, DEFAULT_RUBRIC, data_available, load_items,  # noqa: F401
                                 load_rubric, rubric_versions, runs_with_answers)
from core.lab.judge_settings import check_base_url, redact_url  # noqa: F401

COMMAND = "judge"
JUDGEMENTS_FILE = "judgements.jsonl"   # one record per judgement, appended as they finish
SUMMARY_FILE = "summary.json"          # the aggregates, written at the end (also after a stop)
_RESUME_KEYS = ("source_run", "data", "mode", "limit", "rubric", "judge_model", "judge_base_url")
HEADLINE_KEYS = ("run_id", "n", "mean_score", "ci95", "failed", "pairwise_win_rate", "cached", "requests",
                 "judgements", "headline_model", "stopped", "seconds")


@dataclass
class Settings:
    run: str | None = option(None, group="source", help="a stage-6 (instruct) run whose responses.json to judge")
    data: str | None = option(None, group="source", help="a registry data set with model answers: "
                                                         "instruction-data-with-response or eval-example-data")
    base_url: str | None = option(None, help="OpenAI-compatible endpoint, e.g. http://localhost:11434/v1 (Ollama)")
    model: str | None = option(None, help="judge model name as the endpoint knows it")
    timeout: float = option(60.0, help="seconds per request (default 60)")
    limit: int | None = option(None, help="judge only the first N instructions")
    concurrency: int = option(2, help="requests in flight (default 2)")
    mode: str = option("both", choices=("single", "pairwise", "both"),
                       help="grade each answer, compare the two models, or both (default)")
    rubric: str = option(DEFAULT_RUBRIC, help="rubric version (core/lab/rubrics/)")
    max_attempts: int = option(4, help="tries per request on 429, 5xx and timeouts (default 4)")
    backoff: float = option(1.0, help="first wait in seconds between retries; doubles each time (default 1)")
    run_id: str | None = option(None, help="id of the judge run (default judge-<time>)")
    resume: bool = option(False, help="continue an interrupted run: finished judgements come from the cache")

    def __post_init__(self):
        if bool(self.run) == bool(self.data):
            raise JudgeError("Judge either a stage-6 run (--run) or a data set (--data), not both or neither.")
        if not self.base_url:
            raise JudgeError("Give the judge's --base-url (for example http://localhost:11434/v1).")
        if not self.model:
            raise JudgeError("Give the judge's --model (for example llama3.2).")
        for run_id in (self.run, self.run_id):
            if run_id:
                runs.validate_run_id(run_id)
        if self.limit is not None and self.limit < 1:
            raise JudgeError("--limit must be at least 1.")
        if self.max_attempts < 1 or self.backoff < 0:
            raise JudgeError("--max-attempts must be at least 1 and --backoff not negative.")
        self.endpoint()  # checks the URL, timeout and concurrency

    def endpoint(self, api_key: str = "") -> EndpointSettings:
        return EndpointSettings(base_url=self.base_url, model=self.model, api_key=api_key, timeout=self.timeout,
                                max_concurrency=self.concurrency, max_attempts=self.max_attempts,
                                backoff_s=self.backoff)


def run(settings: Settings, progress: Callable[[str], None] | None = None) -> dict:
    """`python -m core judge`: the endpoint's key from the environment, then `judge_run`."""
    run_id = settings.run_id or runs.new_run_id("judge")
    endpoint = settings.endpoint(judge_settings.command_line_key(settings.base_url))
    return judge_run(run_id, endpoint, source_run=settings.run, data=settings.data, mode=settings.mode,
                     limit=settings.limit, rubric_version=settings.rubric, resume=settings.resume,
                     progress=progress)


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _config(run_id, settings, source_run, data, mode, limit, rubric, labels, items, total) -> dict:
    return {"source_run": source_run, "data": data, "mode": mode, "limit": limit, "labels": labels,
            "items": len(items), "total": total, "rubric": {"version": rubric.version, "sha256": rubric.sha256},
            "judge_model": settings.model, "judge_base_url": redact_url(settings.base_url),
            "judge": settings.public()}


def _open_run(run_id: str, config: dict, source_run: str | None, resume: bool) -> runs.Run:
    run = runs.create_run(run_id, "judge", config, parent=source_run, resume=resume)
    if resume:
        changed = [k for k in _RESUME_KEYS if run.config.get(k) != config[k]]
        if run.stage != "judge" or changed:
            raise JudgeError(f"Run {run_id!r} was started with other settings ({', '.join(changed) or 'stage'}); "
                             "resume it with the same ones, or start a new run id.")
    return run


def _progress_reporter(run_id: str, path, total: int, progress) -> tuple[list[dict], Callable[[dict], None]]:
    done: list[dict] = []
    last = [0.0]

    def on_record(record: dict) -> None:
        done.append(record)
        runs.append_jsonl(path, record)
        now = time.perf_counter()
        if now - last[0] > 1.0 or len(done) == total:
            last[0] = now
            failed = sum(r["status"] != "ok" for r in done)
            cached = sum(bool(r.get("cached")) for r in done)
            message = f"Judged {len(done)}/{total} ({cached} from the cache, {failed} failed)"
            if progress:
                progress(message)
            # Progress only: the state stays as it is (running, or stopping if Stop was pressed).
            runs.write_status(run_id, None, message=message, done=len(done), total=total)

    return done, on_record


def judge_run(run_id: str, settings: EndpointSettings, source_run: str | None = None,
              data: str | None = None, mode: str = "both", limit: int | None = None,
              rubric_version: str = DEFAULT_RUBRIC, resume: bool = False,
              progress: Callable[[str], None] | None = None, cache: JudgeCache | None = None,
              sleep: Callable[[float], None] = time.sleep) -> dict:
    """Judge a run's answers (or a data set's) into run `run_id`; returns the headline dict.

    Resuming replays the finished judgements from the cache (no requests) and asks the rest.
    """
    started = time.perf_counter()
    rubric = load_rubric(rubric_version)
    if limit is not None and limit < 1:
        raise JudgeError("--limit must be at least 1.")
    judge_settings.check_base_url(settings.base_url)
    items, labels = load_items(source_run, data)
    items = items[:limit] if limit else items
    if mode == "both" and len(labels) < 2:
        mode = "single"  # one answer per instruction: there is nothing to compare it with
    total = len(plan_tasks(items, labels, mode))
    config = _config(run_id, settings, source_run, data, mode, limit, rubric, labels, items, total)
    run = _open_run(run_id, config, source_run, resume)
    path = run.path / JUDGEMENTS_FILE
    runs.write_bytes_atomic(path, b"")  # a resume rebuilds the file; finished ones come from the cache
    judge = Judge(settings, rubric, cache=cache, sleep=sleep)
    done, on_record = _progress_reporter(run_id, path, total, progress)

    def finish(records: list[dict], stopped: bool, error: str | None) -> dict:
        summary = J.summarize(records, labels) if records else {
            "n": 0, "judgements": 0, "mean_score": None, "ci95": None, "failed": 0, "cached": 0,
            "pairwise_win_rate": None, "models": {}, "pairwise": None}
        summary.update(run_id=run_id, mode=mode, labels=labels, total=total,
                       complete=not stopped and error is None and len(records) == total,
                       stopped=stopped, error=error, failure_reason=main_reason(records),
                       requests=judge.requests_sent, structured_output=judge.output_format,
                       rubric={"version": rubric.version, "sha256": rubric.sha256},
                       judge=settings.public(), seconds=round(time.perf_counter() - started, 2))
        runs.write_json_atomic(run.path / SUMMARY_FILE, summary)
        return summary

    try:
        records, stopped = evaluate(judge, items, labels, mode, on_record=on_record,
                                    should_stop=lambda: runs.stop_requested(run_id))
    except EndpointUnusable as exc:
        finish(done, stopped=False, error=str(exc))
        _mark(run_id, "failed", str(exc))
        raise
    # Rewrite in a stable order (by item) now that everything is in.
    runs.write_bytes_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    error = None
    if records and all(r["status"] != "ok" for r in records):
        error = f"All {len(records)} judgements failed. The judge said: {main_reason(records)}"
    summary = finish(records, stopped, error)
    if error:
        _mark(run_id, "failed", error)
        raise JudgeError(error)
    headline = {k: summary[k] for k in HEADLINE_KEYS}
    headline["mean_scores"] = {label: m["mean_score"] for label, m in summary["models"].items()}
    headline["rouge_l"] = {label: m["rouge_l"] for label, m in summary["models"].items()}
    if not stopped:  # "finished" comes with its figures: a reader never sees one without the other
        _mark(run_id, "finished", "Finished.", done=len(records), total=total, result=headline)
    return headline


def _mark(run_id: str, state: str, message: str, **fields) -> None:
    """How a run called directly (not from `python -m core` or a job) ended; those two record it."""
    if runs.read_status(run_id).get("state") in ("reserved", "running"):
        error = {"error": message} if state == "failed" else {}
        runs.write_status(run_id, state, message=message, **error, **fields)


# ---------------------------------------------------------------------------- what pages use

def read_judgements(run_id: str) -> list[dict]:
    return runs.read_jsonl(runs.run_dir(run_id) / JUDGEMENTS_FILE)


def read_summary(run_id: str) -> dict | None:
    path = runs.run_dir(run_id) / SUMMARY_FILE
    return runs.read_json(path) if path.is_file() else None


def results(run_id: str) -> dict:
    """A judge run for the page: its config (URL redacted again), records and summary."""
    config = dict(runs.open_run(run_id).config)
    if "labels" not in config:
        raise JudgeError(f"Run {run_id} is damaged: its config.json has no labels.")
    config["judge_base_url"] = redact_url(config.get("judge_base_url", "?"))
    records = read_judgements(run_id)
    summary = read_summary(run_id) or (J.summarize(records, config["labels"]) if records else None)
    return {"config": config, "records": records, "summary": summary}


def new_run_id() -> str:
    return runs.new_run_id("judge")


def has_config(run_id: str) -> bool:
    """False while a job is queued or starting (its run has no config.json yet)."""
    return (runs.run_dir(run_id) / "config.json").is_file()


def judgement_table(records: list[dict]) -> list[dict]:
    """One row per judgement, for the page's table and its CSV download."""
    return [{"item": r["item"], "kind": r["kind"], "model": r.get("model") or f"{r['second']} vs {r['first']}",
             "score": r.get("score") if r["kind"] == "single" else None, "verdict": r.get("outcome"),
             "ROUGE-L": r.get("rouge_l"), "status": r["status"], "instruction": r["instruction"],
             "answer": r.get("answer", r.get("answer_second", "")),
             "rationale": r.get("rationale") or r.get("rationale_ab") or r.get("error") or ""} for r in records]


def rubric_rows(rubric: J.Rubric) -> list[dict]:
    overall = rubric.overall
    return [{"criterion": c["name"], "scale": f"{c['min']}–{c['max']}", "what it asks": c["description"]}
            for c in rubric.criteria] + [{"criterion": "overall score", "scale": f"{overall['min']}–{overall['max']}",
                                          "what it asks": overall["description"]}]


def run_caption(config: dict, summary: dict) -> str:
    """Which judge, which rubric, how many judgements came from the cache or failed."""
    rubric = config.get("rubric") or {}
    text = (f"Judge `{config.get('judge_model', '?')}` at `{redact_url(config.get('judge_base_url', '?'))}` · "
            f"rubric {rubric.get('version', '?')} (sha256 `{str(rubric.get('sha256', '?'))[:16]}…`) · "
            f"{summary.get('cached', 0)} judgements from the cache, {summary.get('failed', 0)} failed")
    return text + (f" · JSON asked as {summary['structured_output']}" if summary.get("structured_output") else "")


def failure_note(summary: dict | None, n_records: int) -> tuple[str, str] | None:
    """("error", text) when the run failed or every judgement did, ("warning", text) for some."""
    if not summary:
        return None
    if summary.get("error") or (n_records and summary.get("failed") == n_records):
        return "error", summary.get("error") or f"Every judgement failed: {summary.get('failure_reason')}"
    if summary.get("failed"):
        return "warning", f"{summary['failed']} of {n_records} judgements failed: {summary.get('failure_reason')}"
    return None


def correlation_note(summary: dict) -> str:
    notes = [f"{label}: r = {m['rouge_judge_correlation']:+.2f}" for label, m in summary["models"].items()
             if m.get("rouge_judge_correlation") is not None]
    return ("Correlation between ROUGE-L and the judge — " + ("; ".join(notes) if notes else "too few points")
            + ". ROUGE-L rewards the reference's wording; the judge rewards being right.")


def model_metric(m: dict) -> tuple[str, str]:
    """A model's mean score as shown, and the note under it (interval, ROUGE-L, failures)."""
    if m.get("mean_score") is None:
        return "—", ""
    low, high = m["ci95"]
    return (f"{m['mean_score']:.1f}", f"95% interval {low:.1f}–{high:.1f} over {m['scored']} answers · "
                                      f"ROUGE-L {m['rouge_l']:.2f} · {m['failed']} failed")


def pairwise_parts(pairwise: dict) -> list[tuple[str, int, str]]:
    """(name, count, colour) of the stacked pairwise bar."""
    return [("wins", pairwise["wins"], "#2ca02c"), ("agreed ties", pairwise["ties"] - pairwise["inconsistent"], "#bbbbbb"),
            ("orders disagree", pairwise["inconsistent"], "#ff7f0e"), ("losses", pairwise["losses"], "#d62728")]


def judge_runs(also: str | None = None) -> list[str]:
    """Judge runs, newest first, with `also` (a job still queued, no config yet) in front."""
    found = [r.id for r in runs.list_runs("judge") if not r.error]
    return ([also] if also and also not in found and runs.run_dir(also).is_dir() else []) + found


def key_for(base_url: str, typed_key: str) -> str:
    """The key the app may send to `base_url`: the one the learner typed, else the server's own
    OPENAI_API_KEY only if `base_url` is the URL it is pinned to."""
    return typed_key or judge_settings.server_key_for(base_url)


def uses_server_key(base_url: str) -> bool:
    return bool(judge_settings.server_key_for(base_url))


def check_endpoint(base_url: str, model: str, typed_key: str = "", timeout: float = 60.0,
                   concurrency: int = 2) -> dict:
    """The page's Test connection (EndpointSettings validation errors are raised)."""
    settings = EndpointSettings(base_url=base_url, model=model, api_key=key_for(base_url, typed_key),
                                timeout=timeout, max_concurrency=concurrency)
    return test_connection(settings)


def start(settings: Settings, run_id: str, typed_key: str = "", owner: str | None = None):
    """A background judge job; its environment carries exactly the key chosen for its URL."""
    check_base_url(settings.base_url)  # refused hosts fail here, before a job slot is taken
    return jobs.start_stage(COMMAND, settings, run_id,
                            env=judge_settings.job_env(key_for(settings.base_url, typed_key)), owner=owner)


def resume_env(run_id: str, form_url: str, typed_key: str) -> dict:
    """The environment for resuming `run_id`: the typed key only if it was typed for that run's
    URL (never your key to someone else's server), else the pinned server key, else none."""
    url = runs.open_run(run_id).config.get("judge_base_url", "")
    key = typed_key if typed_key and judge_settings.same_endpoint(url, form_url) else ""
    return judge_settings.job_env(key or judge_settings.server_key_for(url))


CODE = {"prompts": (J.single_messages, J.pairwise_messages), "parsing": (J.parse_single_reply,),
        "scores": (J.bootstrap_ci, J.pairwise_outcome, J.rouge_l)}
