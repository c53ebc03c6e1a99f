"""Stage 7 — LLM-judge evaluation: a stronger model grades the stage-6 answers against a frozen rubric,
and compares two models' answers in both orders, with ROUGE-L beside it (a job: core.stages.judge)."""

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.stages import judge as stage
from pages._ui import escape, owner, no_remote_images, page_header, remembered_run, show_error
from pages._ui.code import code_behind
from pages._ui.live import live_panel

RUN_KEY = "judge_run"
COLOURS = {0: "#7f7f7f", 1: "#1f77b4"}


def safe(text) -> str:  # remote text (server errors, model ids): escaped, no remote images
    return no_remote_images(escape(text))


page_header(7, "A stronger model grades the answers against a frozen rubric. Is the tuned model "
               "really better, and how sure can we be?")

st.header("1. The judge endpoint")
st.markdown("Any server that speaks OpenAI's chat-completions protocol can judge. A local one (Ollama, llama.cpp, "
            "LM Studio, `python -m core serve`) works offline and costs nothing; see `docs/offline-judge.md`.")


def _apply_preset() -> None:
    if preset := stage.PRESETS.get(st.session_state["judge_preset"]):
        st.session_state["judge_base_url"], st.session_state["judge_model"] = preset.base_url, preset.model


if "judge_base_url" not in st.session_state:
    st.session_state["judge_preset"] = "Ollama"
    _apply_preset()
left, right = st.columns(2)
preset_name = left.selectbox("Preset", [*stage.PRESETS, "Custom"], key="judge_preset", on_change=_apply_preset)
if preset_name in stage.PRESETS:
    left.caption(stage.PRESETS[preset_name].note)
base_url = left.text_input("Base URL", key="judge_base_url")
model_name = left.text_input("Judge model", key="judge_model")
typed_key = right.text_input("API key", type="password", key="judge_api_key",
                             help="Kept in this server's memory for this session only; a job gets it through its "
                                  "environment. Local servers accept any value.")
if not typed_key and stage.uses_server_key(base_url):
    right.caption("Using the server's `OPENAI_API_KEY` (it is pinned to this URL).")
timeout = right.number_input("Timeout per request (s)", 1.0, 600.0, 60.0, step=5.0, key="judge_timeout")
concurrency = right.number_input("Requests at once", 1, 16, 2, key="judge_concurrency")
if st.button("Test connection", key="judge_test"):
    try:
        with st.spinner("Asking the endpoint…"):
            report = stage.check_endpoint(base_url, model_name, typed_key, float(timeout), int(concurrency))
    except stage.JudgeError as e:
        show_error(e)
    else:
        (st.success if report["ok"] else st.error)(safe(report["message"]))
        if report["models"]:
            st.expander(f"Models the endpoint lists ({len(report['models'])})").dataframe({"model": report["models"]})
st.header("2. The rubric (frozen)")
try:
    rubric = stage.load_rubric(st.selectbox("Rubric version", stage.rubric_versions(), key="judge_rubric"))
except stage.JudgeError as e:
    show_error(e)
    st.stop()
st.markdown(f"**{escape(rubric.data.get('title', rubric.version))}** — sha256 `{rubric.sha256[:16]}…`. "
            "Every score stores this hash; changing the rubric means a new version, never an edit.")
st.dataframe(pd.DataFrame(stage.rubric_rows(rubric)), hide_index=True, width="stretch")
with st.expander("The rubric file, exactly as the judge sees it"):
    st.code(rubric.text, language="json")
code_behind(*stage.CODE["prompts"], *stage.CODE["parsing"], title="The code behind this: the prompts and reading the reply")
st.header("3. Judge the answers")
answer_runs = stage.runs_with_answers()
source_kind = st.radio("Answers from", ["A stage-6 run", "A data set"], horizontal=True,
                       index=0 if answer_runs else 1, key="judge_source_kind")
source = {}
if source_kind == "A stage-6 run" and answer_runs:
    source = {"run": st.selectbox("Run with answers (stage 6, or DPO)", answer_runs, key="judge_source_run")}
elif source_kind == "A stage-6 run":
    st.info("No instruction-tuned run with answers yet: finish stage 6 first, or judge a data set.")
else:
    source = {"data": st.selectbox("Data set", list(stage.DATA_ANSWER_KEYS), key="judge_source_data",
                                   help="eval-example-data holds two models' answers, so pairwise works too.")}
    if not stage.data_available(source["data"]):
        st.warning(f"{source['data']} is not on this machine yet: fetch it on the Home page or with "
                   f"`python -m core data fetch {source['data']}`.")
cols = st.columns(3)
mode = cols[0].radio("Mode", ["both", "single", "pairwise"], key="judge_mode",
                     help="single: a score per answer; pairwise: base vs tuned, asked in both orders.")
limit = cols[1].number_input("Instructions to judge", 1, 2000, 20, key="judge_limit")
if "judge_new_id" not in st.session_state or st.session_state.pop("judge_fresh_id", False):
    st.session_state["judge_new_id"] = stage.new_run_id()
new_id = cols[2].text_input("Run id", key="judge_new_id")
if st.button("Start judging", type="primary", key="judge_start", disabled=not source):
    try:
        stage.start(stage.Settings(**source, base_url=base_url, model=model_name, timeout=float(timeout), mode=mode,
                                   concurrency=int(concurrency), limit=int(limit), rubric=rubric.version,
                                   run_id=new_id), new_id, typed_key, owner=owner())
    except stage.GlassBoxError as e:
        show_error(e)
    else:  # show the new run; the next start gets a new id
        st.session_state.update({RUN_KEY: new_id, "judge_show": new_id, "judge_fresh_id": True})
        st.rerun()

remembered = remembered_run(RUN_KEY, ("judge",), stage.COMMAND)
judge_runs = stage.judge_runs(also=remembered)  # a queued job has no config.json yet
if not judge_runs:
    st.info("No judge run yet. Point the form above at a judge, then start judging.")
    st.stop()

st.header("4. Results")
if st.session_state.get("judge_show") not in judge_runs:
    st.session_state["judge_show"] = remembered if remembered in judge_runs else judge_runs[0]
run_id = st.selectbox("Judge run", judge_runs, key="judge_show")

# Stop / Resume, polled only while the job runs; Resume passes a key only for that run's own URL.
live_panel(run_id, lambda _: None, key="judge", every=2,
           resume_env=stage.resume_env(run_id, base_url, typed_key) if stage.has_config(run_id) else None)
if not stage.has_config(run_id):
    st.info("The job is starting…")
    st.stop()
try:
    found = stage.results(run_id)
except stage.GlassBoxError as e:
    show_error(e)
    st.stop()
config, records, summary = found["config"], found["records"], found["summary"]
note = stage.failure_note(summary, len(records))
if note:
    (st.error if note[0] == "error" else st.warning)(safe(note[1]), icon="❌" if note[0] == "error" else "⚠️")
if not records or not summary:
    st.info("No judgements yet.")
    st.stop()
labels = config.get("labels") or list(summary.get("models", {}))
st.caption(safe(stage.run_caption(config, summary)))
metric_cols = st.columns(len(labels) + 1)
for col, label in zip(metric_cols, labels):
    value, note = stage.model_metric(summary["models"].get(label, {}))
    col.metric(f"{label}: mean judge score", value, help=note or None)
    if note:
        col.caption(note)
pairwise = summary.get("pairwise")
if pairwise and pairwise.get("win_rate") is not None:
    metric_cols[-1].metric(f"{pairwise['second']} wins (pairwise)", f"{pairwise['win_rate']:.0%}",
                           help="Both orders asked; when the orders disagree it counts as a tie.")
code_behind(*stage.CODE["scores"], title="The code behind this: the interval, the pairwise verdict, ROUGE-L")
ok = pd.DataFrame([r for r in records if r["kind"] == "single" and r["status"] == "ok"])
if not ok.empty:  # no charts of nothing: a run whose judgements all failed says so above
    chart_cols = st.columns(2)
    hist, scatter = go.Figure(), go.Figure()
    for i, label in enumerate(labels):
        part = ok[ok["model"] == label]
        hist.add_trace(go.Histogram(x=part["score"], name=str(label), opacity=0.7, marker_color=COLOURS.get(i),
                                    xbins=dict(start=0, end=100.01, size=5)))
        scatter.add_trace(go.Scatter(x=part["rouge_l"], y=part["score"], mode="markers", name=str(label),
                                     marker_color=COLOURS.get(i), customdata=part["item"],
                                     hovertemplate="item %{customdata}<br>ROUGE-L %{x:.2f}<br>judge %{y}"))
    hist.update_layout(barmode="overlay", title="Judge scores per model", xaxis_title="score (0–100)",
                       yaxis_title="answers", height=340, margin=dict(t=40, b=40))
    scatter.update_layout(title="Word overlap (ROUGE-L) vs the judge", xaxis_title="ROUGE-L vs reference", height=340,
                          yaxis_title="judge score", xaxis_range=[-0.02, 1.02], yaxis_range=[-2, 102], margin=dict(t=40, b=40))
    chart_cols[0].plotly_chart(hist, key="judge_hist", width="stretch")
    chart_cols[1].plotly_chart(scatter, key="judge_rouge", width="stretch")
    st.caption(stage.correlation_note(summary))
if pairwise and pairwise.get("compared"):
    n = pairwise["compared"]
    bar = go.Figure([go.Bar(y=[f"{pairwise['second']} vs {pairwise['first']}"], x=[count / n], name=name,
                            orientation="h", marker_color=colour, text=f"{count}", textposition="inside")
                     for name, count, colour in stage.pairwise_parts(pairwise)])
    bar.update_layout(barmode="stack", title=f"Pairwise: {n} comparisons, both orders",
                      xaxis_tickformat=".0%", xaxis_range=[0, 1], height=220, margin=dict(t=40, b=30))
    st.plotly_chart(bar, key="judge_pairwise", width="stretch")
    st.caption("'Orders disagree': the judge changed its mind when the answers swapped places (position bias); ties.")
st.subheader("Every judgement")
table = pd.DataFrame(stage.judgement_table(records))
st.dataframe(table, hide_index=True, width="stretch", key="judge_table", column_config={
    "score": st.column_config.NumberColumn(format="%.0f", width="small"),
    "ROUGE-L": st.column_config.NumberColumn(format="%.2f", width="small"),
    "instruction": st.column_config.TextColumn(width="medium"), "answer": st.column_config.TextColumn(width="medium"),
    "rationale": st.column_config.TextColumn(width="large")})
with st.expander("Raw replies of the judge"):
    item = st.selectbox("Item", sorted({r["item"] for r in records}), key="judge_raw_item")
    for r in (r for r in records if r["item"] == item):
        st.markdown(safe(f"**{r.get('model') or 'pairwise'}** — {r['status']}" + (f": {r['error']}" if r.get("error") else "")))
        for reply in (r.get(name) for name in ("raw_reply", "raw_reply_ab", "raw_reply_ba") if r.get(name) is not None):
            st.code(reply, language=None)
down = st.columns(2)
down[0].download_button("Download CSV", table.to_csv(index=False).encode("utf-8"), file_name=f"{run_id}-judgements.csv",
                        mime="text/csv", key="judge_csv")
down[1].download_button("Download JSON", json.dumps({"summary": summary, "judgements": records}, indent=1).encode(),
                        file_name=f"{run_id}.json", mime="application/json", key="judge_json")
