"""Stage 7 — LLM-judge evaluation: what does "better" mean when there is no exact answer?

A stronger model (any OpenAI-compatible endpoint: OpenAI, Ollama, vLLM, llama.cpp, LM Studio)
grades the answers of the stage-6 models against a frozen rubric, and compares the pre-trained and
the instruction-tuned answer side by side in both orders. ROUGE-L (word overlap with the
reference) sits next to the judge's score so the learner sees how differently the two measure.
The judging runs as a background job (core/judge.py); this page only collects settings and draws.
"""

import json
import os

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.lab import data as data_registry
from core.lab import jobs, runs
from core.gpt import judge as J
from core.gpt.errors import GlassBoxError
from pages._ui import STATE_ICONS, escape, page_header, show_error

RUN_KEY = "judge_run"        # session key: the judge run this page shows
COLOURS = {0: "#7f7f7f", 1: "#1f77b4"}

page_header(7, "A stronger model grades the answers against a frozen rubric. Is the tuned model "
               "really better, and how sure can we be?")


# ------------------------------------------------------------------------------ 1. the judge

st.header("1. The judge endpoint")
st.markdown("Any server that speaks OpenAI's chat-completions protocol can judge. A local one "
            "(Ollama, llama.cpp, LM Studio) works offline and costs nothing; see "
            "`docs/offline-judge.md`.")


def _apply_preset() -> None:
    preset = J.PRESETS.get(st.session_state["judge_preset"])
    if preset:
        st.session_state["judge_base_url"] = preset.base_url
        st.session_state["judge_model"] = preset.model


if "judge_base_url" not in st.session_state:
    st.session_state["judge_preset"] = "Ollama"
    _apply_preset()

left, right = st.columns(2)
with left:
    preset_name = st.selectbox("Preset", [*J.PRESETS, "Custom"], key="judge_preset", on_change=_apply_preset)
    if preset_name in J.PRESETS:
        st.caption(J.PRESETS[preset_name].note)
    base_url = st.text_input("Base URL", key="judge_base_url")
    model_name = st.text_input("Judge model", key="judge_model")
with right:
    # The key stays in this server's memory: it goes to the job through its environment only, and
    # is never written into the run, the cache, the log — or sent back to the browser.
    typed_key = st.text_input("API key", type="password", key="judge_api_key",
                              help="Kept in memory for this session only. Local servers accept any value.")
    env_key = os.environ.get("OPENAI_API_KEY", "")
    if not typed_key and env_key:
        st.caption("Using `OPENAI_API_KEY` from the server's environment.")
    timeout = st.number_input("Timeout per request (s)", 1.0, 600.0, 60.0, step=5.0, key="judge_timeout")
    concurrency = st.number_input("Requests at once", 1, 16, 2, key="judge_concurrency")
api_key = typed_key or env_key


def endpoint_settings() -> J.EndpointSettings | None:
    try:
        return J.EndpointSettings(base_url=base_url, model=model_name, api_key=api_key,
                                  timeout=float(timeout), max_concurrency=int(concurrency))
    except GlassBoxError as e:
        show_error(e)
        return None


if st.button("Test connection", key="judge_test"):
    settings = endpoint_settings()
    if settings is not None:
        with st.spinner("Asking the endpoint…"):
            report = J.test_connection(settings)
        (st.success if report["ok"] else st.error)(report["message"])
        if report["models"]:
            with st.expander(f"Models the endpoint lists ({len(report['models'])})"):
                st.write(report["models"])


# ------------------------------------------------------------------------------ 2. the rubric

st.header("2. The rubric (frozen)")
try:
    rubric = J.load_rubric(st.selectbox("Rubric version", J.rubric_versions(), key="judge_rubric"))
except GlassBoxError as e:
    show_error(e)
    st.stop()
st.markdown(f"**{escape(rubric.data.get('title', rubric.version))}** — sha256 `{rubric.sha256[:16]}…`. "
            "Every score stores this hash; changing the rubric means a new version, never an edit.")
st.dataframe(pd.DataFrame([{"criterion": c["name"], "scale": f"{c['min']}–{c['max']}",
                            "what it asks": c["description"]} for c in rubric.criteria]
                          + [{"criterion": "overall score", "scale": f"{rubric.overall['min']}–{rubric.overall['max']}",
                              "what it asks": rubric.overall["description"]}]),
             hide_index=True, width="stretch")
with st.expander("The rubric file, exactly as the judge sees it"):
    st.code(rubric.text, language="json")


# ------------------------------------------------------------------------------ 3. what to judge

st.header("3. Judge the answers")
stage6_runs = [r.id for r in runs.list_runs("instruct") if not r.error and (r.path / "responses.json").is_file()]
source_kind = st.radio("Answers from", ["A stage-6 run", "A data set"], horizontal=True,
                       index=0 if stage6_runs else 1, key="judge_source_kind")
if source_kind == "A stage-6 run":
    if not stage6_runs:
        st.info("No instruction-tuned run with answers yet: finish stage 6 first, or judge a data set.")
    source_args = ["--run", st.selectbox("Stage-6 run", stage6_runs, key="judge_source_run")] if stage6_runs else None
else:
    data_name = st.selectbox("Data set", list(J.DATA_ANSWER_KEYS), key="judge_source_data",
                             help="instruction-data-with-response: one model's answers (the book's "
                                  "GPT-2 medium); eval-example-data: two models, so pairwise works too.")
    source_args = ["--data", data_name]
    if data_registry.find(data_name) is None:
        st.warning(f"{data_name} is not on this machine yet: fetch it on the Home page or with "
                   f"`python -m core data fetch {data_name}`.")

cols = st.columns(3)
mode = cols[0].radio("Mode", ["both", "single", "pairwise"], key="judge_mode",
                     help="single: a score per answer; pairwise: base vs tuned, asked in both orders.")
limit = cols[1].number_input("Instructions to judge", 1, 2000, 20, key="judge_limit")
if "judge_new_id" not in st.session_state or st.session_state.pop("judge_fresh_id", False):
    st.session_state["judge_new_id"] = runs.new_run_id("judge")
new_id = cols[2].text_input("Run id", key="judge_new_id")

if st.button("Start judging", type="primary", key="judge_start", disabled=source_args is None):
    settings = endpoint_settings()
    if settings is not None:
        argv = ["judge", *source_args, "--base-url", settings.base_url, "--model", settings.model,
                "--timeout", str(settings.timeout), "--concurrency", str(settings.max_concurrency),
                "--mode", mode, "--limit", str(int(limit)), "--rubric", rubric.version, "--run-id", new_id]
        try:
            jobs.start_job(argv, new_id, env={"OPENAI_API_KEY": api_key} if api_key else None)
        except GlassBoxError as e:
            show_error(e)
        else:
            st.session_state[RUN_KEY] = st.session_state["judge_show"] = new_id
            st.session_state["judge_fresh_id"] = True  # the next start gets a new id
            st.rerun()


# ------------------------------------------------------------------------------ 4. the run

judge_runs = [r.id for r in runs.list_runs("judge") if not r.error]
remembered = st.session_state.get(RUN_KEY)
for job in jobs.active_jobs():
    if remembered is None and job.command == "judge":
        remembered = job.run_id
if remembered and remembered not in judge_runs and runs.run_dir(remembered).is_dir():
    judge_runs.insert(0, remembered)  # a job that has not written its config.json yet
if not judge_runs:
    st.info("No judge run yet. Point the form above at a judge, then start judging.")
    st.stop()

st.header("4. Results")
if st.session_state.get("judge_show") not in judge_runs:
    st.session_state["judge_show"] = remembered if remembered in judge_runs else judge_runs[0]
run_id = st.selectbox("Judge run", judge_runs, key="judge_show")


@st.fragment(run_every=2)
def job_panel(run_id: str) -> None:
    """The job's state, progress and Stop / Resume (Resume passes the key again, via env only)."""
    try:
        state = jobs.job_state(run_id)
    except GlassBoxError as e:
        show_error(e)
        return
    status = runs.read_status(run_id)
    cols = st.columns([4, 1, 1])
    cols[0].markdown(f"{STATE_ICONS.get(state.state, '❔')} **{escape(run_id)}** — {escape(state.state)}"
                     + (f": {escape(state.message)}" if state.message else ""))
    if state.active and status.get("total"):
        st.progress(min(1.0, status.get("done", 0) / status["total"]),
                    text=f"{status.get('done', 0)} of {status['total']} judgements")
    if state.active and cols[1].button("Stop", key="judge_stop"):
        jobs.stop_job(run_id)
        st.rerun()
    if state.state in ("stopped", "failed") and state.argv and cols[2].button("Resume", key="judge_resume"):
        try:
            jobs.resume_job(run_id, env={"OPENAI_API_KEY": api_key} if api_key else None)
        except GlassBoxError as e:
            show_error(e)
        else:
            st.rerun()
    if state.state == "failed" and state.error:
        st.error(state.error, icon="❌")
    # When the job ends, redraw the whole page once so the results below appear.
    was_active = st.session_state.get("judge_was_active")
    st.session_state["judge_was_active"] = state.active
    if was_active and not state.active:
        st.rerun(scope="app")


job_panel(run_id)

if not (runs.run_dir(run_id) / "config.json").is_file():
    st.info("The job is starting…")
    st.stop()
try:
    config = runs.open_run(run_id).config
    records = J.read_judgements(run_id)
    summary = J.read_summary(run_id) or (J.summarize(records, config["labels"]) if records else None)
except (GlassBoxError, KeyError) as e:
    show_error(e if isinstance(e, GlassBoxError) else GlassBoxError(f"Run {run_id} is damaged: no {e}."))
    st.stop()
if not records or not summary:
    st.info("No judgements yet.")
    st.stop()

labels = config.get("labels") or list(summary.get("models", {}))
st.caption(f"Judge `{escape(config.get('judge_model', '?'))}` at `{escape(config.get('judge_base_url', '?'))}` · "
           f"rubric {escape(config.get('rubric', {}).get('version', '?'))} "
           f"(sha256 `{escape(config.get('rubric', {}).get('sha256', '?')[:16])}…`) · "
           f"{summary.get('cached', 0)} judgements from the cache, {summary.get('failed', 0)} failed"
           + (f" · JSON asked as {escape(summary['structured_output'])}" if summary.get("structured_output") else ""))

metric_cols = st.columns(len(labels) + 1)
for col, label in zip(metric_cols, labels):
    m = summary["models"].get(label, {})
    if m.get("mean_score") is not None:
        low, high = m["ci95"]
        col.metric(f"{label}: mean judge score", f"{m['mean_score']:.1f}",
                   help=f"95% bootstrap interval {low:.1f}–{high:.1f} over {m['scored']} answers")
        col.caption(f"95% interval {low:.1f}–{high:.1f} · ROUGE-L {m['rouge_l']:.2f} · {m['failed']} failed")
    else:
        col.metric(f"{label}: mean judge score", "—")
pairwise = summary.get("pairwise")
if pairwise and pairwise.get("win_rate") is not None:
    metric_cols[-1].metric(f"{pairwise['second']} wins (pairwise)", f"{pairwise['win_rate']:.0%}",
                           help="Both orders asked; when the orders disagree it counts as a tie.")

# -- score histogram per model and ROUGE-L vs judge
singles = pd.DataFrame([r for r in records if r["kind"] == "single"])
if not singles.empty:
    chart_cols = st.columns(2)
    hist = go.Figure()
    for i, label in enumerate(labels):
        scores = singles[(singles["model"] == label) & (singles["status"] == "ok")]["score"]
        hist.add_trace(go.Histogram(x=scores, name=str(label), opacity=0.7,
                                    xbins=dict(start=0, end=100.01, size=5), marker_color=COLOURS.get(i)))
    hist.update_layout(barmode="overlay", title="Judge scores per model", xaxis_title="score (0–100)",
                       yaxis_title="answers", height=340, margin=dict(t=40, b=40))
    chart_cols[0].plotly_chart(hist, key="judge_hist", width="stretch")

    ok = singles[singles["status"] == "ok"]
    scatter = go.Figure()
    for i, label in enumerate(labels):
        part = ok[ok["model"] == label]
        scatter.add_trace(go.Scatter(x=part["rouge_l"], y=part["score"], mode="markers", name=str(label),
                                     marker_color=COLOURS.get(i), customdata=part["item"],
                                     hovertemplate="item %{customdata}<br>ROUGE-L %{x:.2f}<br>judge %{y}"))
    scatter.update_layout(title="Word overlap (ROUGE-L) vs the judge", xaxis_title="ROUGE-L vs reference",
                          yaxis_title="judge score", xaxis_range=[-0.02, 1.02], yaxis_range=[-2, 102],
                          height=340, margin=dict(t=40, b=40))
    chart_cols[1].plotly_chart(scatter, key="judge_rouge", width="stretch")
    notes = [f"{label}: r = {m['rouge_judge_correlation']:+.2f}" for label, m in summary["models"].items()
             if m.get("rouge_judge_correlation") is not None]
    st.caption("Correlation between ROUGE-L and the judge — " + ("; ".join(notes) if notes else "too few points")
               + ". ROUGE-L rewards the reference's wording; the judge rewards being right.")

# -- pairwise win / tie / loss
if pairwise and pairwise.get("compared"):
    n = pairwise["compared"]
    parts = [("wins", pairwise["wins"], "#2ca02c"), ("agreed ties", pairwise["ties"] - pairwise["inconsistent"], "#bbbbbb"),
             ("orders disagree", pairwise["inconsistent"], "#ff7f0e"), ("losses", pairwise["losses"], "#d62728")]
    bar = go.Figure([go.Bar(y=[f"{pairwise['second']} vs {pairwise['first']}"], x=[count / n], name=name,
                            orientation="h", marker_color=colour, text=f"{count}", textposition="inside")
                     for name, count, colour in parts])
    bar.update_layout(barmode="stack", title=f"Pairwise: {pairwise['compared']} comparisons, both orders",
                      xaxis_tickformat=".0%", xaxis_range=[0, 1], height=220, margin=dict(t=40, b=30))
    st.plotly_chart(bar, key="judge_pairwise", width="stretch")
    st.caption("'Orders disagree' means the judge changed its mind when the answers swapped places "
               "(position bias); those count as ties.")

# -- the table, raw replies on demand, downloads
st.subheader("Every judgement")
table = pd.DataFrame([{
    "item": r["item"], "kind": r["kind"], "model": r.get("model") or f"{r['second']} vs {r['first']}",
    "score": r.get("score") if r["kind"] == "single" else None, "verdict": r.get("outcome"),
    "ROUGE-L": r.get("rouge_l"), "status": r["status"], "instruction": r["instruction"],
    "answer": r.get("answer", r.get("answer_second", "")),
    "rationale": r.get("rationale") or r.get("rationale_ab") or r.get("error") or "",
} for r in records])
st.dataframe(table, hide_index=True, width="stretch", key="judge_table", column_config={
    "score": st.column_config.NumberColumn(format="%.0f", width="small"),
    "ROUGE-L": st.column_config.NumberColumn(format="%.2f", width="small"),
    "instruction": st.column_config.TextColumn(width="medium"),
    "answer": st.column_config.TextColumn(width="medium"),
    "rationale": st.column_config.TextColumn(width="large")})

with st.expander("Raw replies of the judge"):
    item = st.selectbox("Item", sorted({r["item"] for r in records}), key="judge_raw_item")
    for r in (r for r in records if r["item"] == item):
        who = r.get("model") or "pairwise"
        st.markdown(f"**{escape(who)}** — {escape(r['status'])}" + (f": {escape(r['error'])}" if r.get("error") else ""))
        for name in ("raw_reply", "raw_reply_ab", "raw_reply_ba"):
            if r.get(name) is not None:
                st.code(r[name], language=None)

down = st.columns(2)
down[0].download_button("Download CSV", table.to_csv(index=False).encode("utf-8"),
                        file_name=f"{run_id}-judgements.csv", mime="text/csv", key="judge_csv")
down[1].download_button("Download JSON", json.dumps({"summary": summary, "judgements": records}, indent=1,
                                                    ensure_ascii=False).encode("utf-8"),
                        file_name=f"{run_id}.json", mime="application/json", key="judge_json")
