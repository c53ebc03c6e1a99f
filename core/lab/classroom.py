"""The classroom at a glance: read-only views of every learner's runs, for the teacher's page.

A teacher with a room of learners on one server asks three questions the run store can answer:

    progress()            who has reached which stage, and whose jobs are running or queued
    leaderboard(minutes)  whose model is best on the same budget (pre-training, classifier, judge)
    report_card(owner)    one learner's work as a page to hand back (HTML that prints to a clean PDF)

Nothing here writes a file or starts a job: every figure is read from `checkpoints/` as the
stages left it. A job writes its headline figures into status.json (`result`); a run made at a
terminal or in the app's own process has none there, so each figure falls back to the file the
stage writes (classify's results.json, the judge's summary.json, instruct's format_rates.json)
and then to the run's last logged metric. The report card is the only HTML, and everything a
learner could have typed (a run id, a data set name, an error message) is escaped in it.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
import struct

from core.gpt.errors import GlassBoxError
from core.lab import jobs, learners, runs

SHARED = "shared"  # how the runs with no owner (the teacher's, a terminal's) are named
MAX_POINTS = 200  # a chart's line never has more points than this: reports stay small
CHARTED_STAGES = ("pretrain", "classify", "instruct", "prefer")  # the stages that train

# (number, title, the run stages shown in that column): the seven stages of the course, titled as
# the pages are. Stage 2 keeps no runs; preference tuning sits beside instruction tuning.
STAGE_COLUMNS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "Text and tokens", ("tokenizer",)),
    (2, "Attention", ()),
    (3, "The GPT architecture", ("import",)),
    (4, "Pre-training", ("pretrain",)),
    (5, "Classification fine-tuning", ("classify",)),
    (6, "Instruction fine-tuning", ("instruct", "prefer")),
    (7, "LLM-judge evaluation", ("judge",)),
)
_COLUMN_OF = {stage: number for number, _, stages in STAGE_COLUMNS for stage in stages}

# A run's headline: (label, key in its result, key in metrics.jsonl), best first. A figure that
# only exists at the end (test accuracy, format-following) has no metric to fall back on.
_FIGURES: dict[str, tuple[tuple[str, str | None, str | None], ...]] = {
    "pretrain": (("val loss", "val_loss", "val_loss"), ("train loss", "train_loss", "train_loss")),
    "classify": (("test accuracy", "test_accuracy", None), ("val accuracy", "val_accuracy", "val_accuracy")),
    "instruct": (("format-following", "format_rate_tuned", None), ("val loss", "val_loss", "val_loss")),
    "prefer": (("reward accuracy", "reward_accuracy", "reward_accuracy"),),
    "judge": (("judge mean", "mean_score", None),),
}
# Where a stage keeps its figures on disk besides status.json (names as in core/stages/*.py;
# tests/test_classroom.py checks they agree, since core.lab may not import core.stages).
CLASSIFY_RESULTS_FILE = "results.json"
JUDGE_SUMMARY_FILE = "summary.json"
INSTRUCT_RATES_FILE = "format_rates.json"
_RATES = {"format_rate_tuned": "tuned", "val_loss": "best_val_loss"}  # format_rates.json's names
_PERCENT = ("test accuracy", "val accuracy", "format-following", "reward accuracy")
_COUNTS = ("vocabulary", "parameters")


class ClassroomError(GlassBoxError):
    """A classroom view asked for something that cannot be shown (e.g. a budget of no minutes)."""


# ---------------------------------------------------------------------------- one run's figure


def _number(value) -> float | int | None:
    """A finite number, or None: a hand-edited or damaged file must not break the teacher's page."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _read_json_dict(path) -> dict:
    """A JSON object from a run's file, or {} when it is missing or damaged (a view never raises)."""
    if not path.is_file() or path.is_symlink():
        return {}
    try:
        value = runs.read_json(path)
    except runs.RunError:
        return {}
    return value if isinstance(value, dict) else {}


def stored_result(run: runs.Run) -> dict:
    """The figures a run ended with: status.json's `result` over the stage's own file.

    Only an ended run (finished or stopped) has them: a resumed run keeps its last session's
    `result` in status.json while it runs again, and those figures are no longer its own."""
    if run.state not in ("finished", "stopped"):
        return {}
    found: dict = {}
    if run.stage == "classify":
        found.update(_read_json_dict(run.path / CLASSIFY_RESULTS_FILE))
    elif run.stage == "judge":
        found.update(_read_json_dict(run.path / JUDGE_SUMMARY_FILE))
    elif run.stage == "instruct":
        rates = _read_json_dict(run.path / INSTRUCT_RATES_FILE)
        found.update({ours: rates[theirs] for ours, theirs in _RATES.items() if theirs in rates})
    result = run.status.get("result")
    if isinstance(result, dict):
        found.update({k: v for k, v in result.items() if v is not None})
    return found


def _last_metric(metrics: list[dict], key: str) -> float | None:
    """The newest logged value of `key` (evaluations are logged every few steps, not every row)."""
    for record in reversed(metrics):
        value = _number(record.get(key))
        if value is not None:
            return value
    return None


def parameter_count(run: runs.Run) -> int | None:
    """Parameters in the run's weights, read from the safetensors header alone (8 bytes of length,
    then JSON naming each tensor's shape): no tensor is loaded, and torch is never imported."""
    path = run.path / "model.safetensors"
    if not path.is_file() or path.is_symlink():
        return None
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                return None  # no real header is this big: a damaged file
            header = json.loads(f.read(size))
        return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    except (OSError, struct.error, ValueError, TypeError, KeyError, AttributeError):
        return None


def headline(run: runs.Run) -> tuple[str, float | None]:
    """The one figure a teacher reads for a run, with its label: what it ended with, else its
    last logged metric while it trains, else the label with None (nothing measured yet)."""
    if run.stage == "tokenizer":
        return "vocabulary", _number(run.config.get("vocab_size"))
    if run.stage == "import":
        return "parameters", parameter_count(run)
    figures = _FIGURES.get(run.stage or "")
    if not figures:
        return "", None
    result, metrics = stored_result(run), None
    for label, result_key, metric_key in figures:
        value = _number(result.get(result_key)) if result_key else None
        if value is None and metric_key:
            metrics = run.metrics() if metrics is None else metrics  # read once, and only if needed
            value = _last_metric(metrics, metric_key)
        if value is not None:
            return label, value
    return figures[0][0], None


def format_value(label: str, value: float | None) -> str:
    """A headline figure as a person reads it: accuracies in percent, counts with separators."""
    if value is None:
        return "—"
    if label in _PERCENT:
        return f"{value:.1%}"
    if label in _COUNTS:
        return f"{int(value):,}"
    return f"{value:.2f}" if label == "judge mean" else f"{value:.3f}"


# ---------------------------------------------------------------------------- progress


def _state(run: runs.Run, active: dict[str, jobs.JobState]) -> str:
    """The run's state as the job view sees it: a job whose process died is reported as failed."""
    if run.state not in jobs.ACTIVE_STATES:
        return run.state
    if run.id in active:
        return active[run.id].state
    try:
        return jobs.job_state(run.id).state
    except GlassBoxError:
        return "unknown"


def _entry(run: runs.Run, active: dict[str, jobs.JobState]) -> dict:
    label, value = headline(run)
    return {"run_id": run.id, "stage": run.stage, "state": _state(run, active), "label": label,
            "value": value, "created": run.created}


def _empty_row(owner: str | None) -> dict:
    return {"learner": owner, "name": owner if owner is not None else SHARED,
            "stages": {number: [] for number, _, _ in STAGE_COLUMNS},
            "runs": 0, "running": 0, "queued": 0, "active_jobs": 0, "reached": 0}


def _learner_runs(owner_filter=None) -> list[tuple[str | None, runs.Run]]:
    """(owner, run) for every readable run of a course stage, newest first."""
    found = []
    for run in runs.list_runs():
        if run.error or run.stage not in _COLUMN_OF:
            continue  # a damaged run has no stage to show it under
        owner = learners.owner_of(run.id)
        if owner_filter is None or owner_filter(owner):
            found.append((owner, run))
    return found


def progress() -> list[dict]:
    """One row per learner, sorted by name, the shared runs (owner None) last.

    Each row: `learner` (None for shared), `name`, `stages` {number: [run entries, newest first]},
    where an entry is {run_id, stage, state, label, value, created}; `runs`; `reached`, the highest
    stage with a finished run; and the learner's jobs now: `running`, `queued`, `active_jobs`."""
    active = {job.run_id: job for job in jobs.active_jobs()}
    rows: dict[str | None, dict] = {}
    for owner, run in _learner_runs():
        row = rows.setdefault(owner, _empty_row(owner))
        entry = _entry(run, active)
        number = _COLUMN_OF[run.stage]
        row["stages"][number].append(entry)
        row["runs"] += 1
        if entry["state"] == "finished":
            row["reached"] = max(row["reached"], number)
    for job in active.values():  # a job can be queued before its run has a config to list
        row = rows.setdefault(job.owner, _empty_row(job.owner))
        row["queued" if job.state in ("queued", "reserved") else "running"] += 1
        row["active_jobs"] += 1
    return sorted(rows.values(), key=lambda r: (r["learner"] is None, r["learner"] or ""))


# ---------------------------------------------------------------------------- leaderboard


def _same_budget(run: runs.Run, minutes: float) -> bool:
    """A `small` pre-training run given `minutes` (within 1 %): only equal budgets compete."""
    train = run.config.get("train") or {}
    budget = _number(train.get("max_minutes")) if isinstance(train, dict) else None
    return run.config.get("preset") == "small" and budget is not None and abs(budget - minutes) <= 0.01 * minutes


def _ranked(rows: list[dict], descending: bool) -> list[dict]:
    """Best first; equal figures share a rank (1, 1, 3), and the earlier run is listed first."""
    rows.sort(key=lambda r: (r["created"], r["run_id"]))
    rows.sort(key=lambda r: r["value"], reverse=descending)
    for i, row in enumerate(rows):
        same = i and rows[i - 1]["value"] == row["value"]
        row["rank"] = rows[i - 1]["rank"] if same else i + 1
    return [{"rank": r["rank"], "owner": r["owner"], "run_id": r["run_id"], "value": r["value"],
             "data": r["data"]} for r in rows]


def leaderboard(minutes: float) -> dict[str, list[dict]]:
    """Three boards of finished runs, best first: "pretrain" (small preset, a budget of `minutes`;
    val loss, lowest first), "classify" (test accuracy) and "judge" (mean score), highest first.

    A row: rank, owner ("shared" for none), run_id, value, data. A run without the figure is left
    out, and so is an unfinished one: a stopped run did not spend its budget, so it is no rival."""
    minutes = _number(minutes)
    if minutes is None or minutes <= 0:
        raise ClassroomError("A leaderboard compares runs of the same budget: give a number of minutes above 0.")
    wanted = {"pretrain": "val loss", "classify": "test accuracy", "judge": "judge mean"}
    boards: dict[str, list[dict]] = {stage: [] for stage in wanted}
    for owner, run in _learner_runs():
        if run.stage not in wanted or run.state != "finished":
            continue
        if run.stage == "pretrain" and not _same_budget(run, minutes):
            continue
        label, value = headline(run)
        if label == wanted[run.stage] and value is not None:
            boards[run.stage].append({"owner": owner if owner is not None else SHARED, "run_id": run.id,
                                      "value": value, "created": run.created, "data": run.config.get("data")})
    return {stage: _ranked(rows, descending=stage != "pretrain") for stage, rows in boards.items()}


# ---------------------------------------------------------------------------- report card


def downsample(points: list, limit: int = MAX_POINTS) -> list:
    """At most `limit` points, evenly spaced, keeping the first and the last: a 5,000-step run
    draws the same shape with 200, and the report stays a few kilobytes."""
    if len(points) <= limit:
        return list(points)
    stride = (len(points) - 1) / (limit - 1)  # > 1, so the rounded indices never repeat
    return [points[round(i * stride)] for i in range(limit)]


def _series(metrics: list[dict], key: str) -> list[tuple[float, float]]:
    points = []
    for record in metrics:
        step, value = _number(record.get("step")), _number(record.get(key))
        if step is not None and value is not None:
            points.append((float(step), float(value)))
    return downsample(points)


_CHART_W, _CHART_H, _LEFT, _RIGHT, _TOP, _BOTTOM = 480, 200, 52, 12, 12, 34
_LINES = (("train", "train_loss", "train loss", "#1f77b4", ""), ("val", "val_loss", "val loss", "#d62728", "5 3"))


def _scale(lo: float, hi: float, start: float, length: float, flip: bool = False):
    """A function from data to pixels along one axis (an empty range is widened, not divided by)."""
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    return lambda v: start + ((hi - v) if flip else (v - lo)) / (hi - lo) * length


def loss_chart_svg(metrics: list[dict], title: str = "loss") -> str:
    """An inline SVG line chart of train loss (and val loss where logged) against step, written
    by hand: one polyline per curve, axes with their end values, a legend. "" with nothing to draw."""
    curves = [(css, label, colour, dash, _series(metrics, key)) for css, key, label, colour, dash in _LINES]
    curves = [c for c in curves if c[4]]
    if not curves:
        return ""
    xs = [x for c in curves for x, _ in c[4]]
    ys = [y for c in curves for _, y in c[4]]
    plot_w, plot_h = _CHART_W - _LEFT - _RIGHT, _CHART_H - _TOP - _BOTTOM
    px = _scale(min(xs), max(xs), _LEFT, plot_w)
    py = _scale(min(ys), max(ys), _TOP, plot_h, flip=True)
    x_axis, y_axis = _TOP + plot_h, _LEFT
    parts = [f'<svg class="chart" viewBox="0 0 {_CHART_W} {_CHART_H}" width="{_CHART_W}" height="{_CHART_H}" '
             f'role="img" aria-label="{html.escape(title)} against step">',
             f'<line x1="{y_axis}" y1="{_TOP}" x2="{y_axis}" y2="{x_axis}" stroke="#555"/>',
             f'<line x1="{y_axis}" y1="{x_axis}" x2="{_LEFT + plot_w}" y2="{x_axis}" stroke="#555"/>',
             f'<text x="{y_axis - 4}" y="{_TOP + 8}" text-anchor="end">{max(ys):.3g}</text>',
             f'<text x="{y_axis - 4}" y="{x_axis}" text-anchor="end">{min(ys):.3g}</text>',
             f'<text x="{y_axis}" y="{x_axis + 14}" text-anchor="middle">{min(xs):,.0f}</text>',
             f'<text x="{_LEFT + plot_w}" y="{x_axis + 14}" text-anchor="end">{max(xs):,.0f}</text>',
             f'<text x="{_LEFT + plot_w / 2}" y="{_CHART_H - 4}" text-anchor="middle">step</text>',
             f'<text x="12" y="{_TOP + plot_h / 2}" text-anchor="middle" '
             f'transform="rotate(-90 12 {_TOP + plot_h / 2})">{html.escape(title)}</text>']
    for i, (css, label, colour, dash, points) in enumerate(curves):
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<polyline class="{css}" fill="none" stroke="{colour}" stroke-width="1.5"{dashed} '
                     f'points="{coords}"/>')
        ly = _TOP + 10 + 14 * i  # the legend, top right, one line per curve
        parts.append(f'<line x1="{_LEFT + plot_w - 90}" y1="{ly - 4}" x2="{_LEFT + plot_w - 70}" y2="{ly - 4}" '
                     f'stroke="{colour}" stroke-width="2"{dashed}/>'
                     f'<text x="{_LEFT + plot_w - 66}" y="{ly}">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 52rem;
       margin: 2rem auto; padding: 0 1rem; line-height: 1.4; }
h1 { margin-bottom: 0.2rem; } .meta { color: #666; margin-top: 0; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 1.6rem; font-size: 1.15rem; }
.run { margin: 0.6rem 0 1rem; } .run h3 { font-size: 1rem; margin: 0 0 0.2rem; }
.run h3 code { background: #f3f3f3; padding: 0 0.3rem; }
.figure { font-weight: 600; } .details, .empty { color: #555; font-size: 0.9rem; margin: 0.1rem 0; }
.state-failed { color: #b00020; } .state-finished { color: #1b5e20; }
.chart { display: block; margin-top: 0.3rem; font-size: 10px; fill: #333; }
@page { size: A4; margin: 15mm; }
@media print {
  body { max-width: none; margin: 0; padding: 0; font-size: 11pt; }
  h2 { break-after: avoid; page-break-after: avoid; }
  .run { break-inside: avoid; page-break-inside: avoid; }
  .chart { width: 12cm; height: auto; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


def _details(run: runs.Run) -> str:
    """What the run was made from, in one line: data, preset, budget, parent (all escaped)."""
    train = run.config.get("train") if isinstance(run.config.get("train"), dict) else {}
    parts = [f"{name} {run.config.get(key)}" for name, key in (("data", "data"), ("preset", "preset"),
                                                             ("from", "parent")) if run.config.get(key)]
    if _number(train.get("max_minutes")):
        parts.append(f"budget {train['max_minutes']} min")
    elif _number(train.get("max_steps")):
        parts.append(f"budget {train['max_steps']} steps")
    parts.append(f"created {run.created}" if run.created else "")
    return " · ".join(html.escape(str(p)) for p in parts if p)


def _run_html(run: runs.Run, state: str) -> str:
    label, value = headline(run)
    figure = f'{html.escape(label)}: {format_value(label, value)}' if label else ""
    lines = [f'<div class="run"><h3><code>{html.escape(run.id)}</code> '
             f'<span class="state-{html.escape(state)}">{html.escape(state)}</span>'
             f'{" · " if figure else ""}<span class="figure">{figure}</span></h3>',
             f'<p class="details">{_details(run)}</p>']
    # Why it failed, or what an unfinished run is doing ("Stopped; checkpoint saved.").
    note = run.status.get("error") if state == "failed" else None if state == "finished" else run.status.get("message")
    if note:
        lines.append(f'<p class="details">{html.escape(str(note))}</p>')
    if run.stage in CHARTED_STAGES:
        lines.append(loss_chart_svg(run.metrics()) or '<p class="empty">No metrics logged yet.</p>')
    lines.append("</div>")
    return "".join(lines)


def report_card(owner: str | None, today: _dt.date | None = None) -> str:
    """One learner's work (`None`: the shared runs) as a self-contained HTML page: for each stage
    their runs with state and headline figure, and a loss chart for every run that trained.

    No script and no external address (fonts, styles and charts are all inline), so it opens
    anywhere offline, and its print stylesheet makes the browser's "Save as PDF" a clean copy."""
    name = owner if owner is not None else SHARED
    date = (today or _dt.date.today()).isoformat()
    active = {job.run_id: job for job in jobs.active_jobs()}
    mine = [run for who, run in _learner_runs(lambda who: who == owner)]
    body = [f"<header><h1>Report card: {html.escape(name)}</h1>"
            f'<p class="meta">Glass Box LLM · {date} · {len(mine)} run{"" if len(mine) == 1 else "s"}</p></header>']
    for number, title, stages in STAGE_COLUMNS:
        body.append(f'<section class="stage"><h2>{number}. {html.escape(title)}</h2>')
        these = [run for run in mine if run.stage in stages]
        if not stages:
            body.append('<p class="empty">This stage keeps no runs: it is explored on its page.</p>')
        elif not these:
            body.append('<p class="empty">No runs yet.</p>')
        body.extend(_run_html(run, _state(run, active)) for run in these)
        body.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Glass Box LLM — {html.escape(name)} — {date}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def report_filename(owner: str | None, today: _dt.date | None = None) -> str:
    """A download name for the report card: the learner and the date, safe on every file system."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", owner if owner is not None else SHARED).strip("-") or SHARED
    return f"glassbox-report-{name}-{(today or _dt.date.today()).isoformat()}.html"
