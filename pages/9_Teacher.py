"""The teacher's page: every learner's progress, the jobs with the teacher's Stop, a leaderboard
at one fixed budget, report cards to download, and a projector mode that follows one live run."""

import streamlit as st

from core.stages import classroom as stage
from pages._ui import job_controls, polling, show_error
from pages._ui.charts import curves_figure
from pages._ui.code import code_behind
from pages._ui.learner import current_actor, teacher_unlock
from pages._ui.live import live_panel

st.title("🧑‍🏫 Teacher")
st.caption("Where each learner is in the seven stages, what is training now, and who leads at one "
           "fixed budget. On a classroom server this page asks for the teacher's key; on your own "
           "laptop you are the teacher.")

actor = current_actor()
if not teacher_unlock(st):
    st.stop()

# ---------------------------------------------------------------------------- projector mode
projector = st.toggle("Projector mode: follow one learner's live run, large, without the sidebar", key="t_projector")
names = stage.learner_names()
if projector:
    st.html("<style>section[data-testid='stSidebar']{display:none} [data-testid='stMetricValue']"
            "{font-size:3.2rem} h1,h2,h3{font-size:2.4rem}</style>")  # fixed CSS, no user text
    if not names:
        st.info("No learner has a run yet: projector mode follows one once they start.", icon="📽️")
        st.stop()
    who = st.selectbox("Follow", names, key="t_follow")
    followed = stage.follow(who)
    if followed is None:
        st.info(f"{who} has no run yet.", icon="📽️")
        st.stop()

    def draw_big(run_id: str) -> None:
        row = stage.run_headline(run_id)
        st.subheader(f"{who} · {row['run_id']} · {row['stage']}")
        cols = st.columns(3)
        cols[0].metric(row["label"] or "figure", "—" if row["value"] is None else f"{row['value']:.4g}")
        cols[1].metric("step", f"{row['step']:,}" if row["step"] is not None else "—")
        cols[2].metric("state", row["state"])
        if row["metrics"]:
            st.plotly_chart(curves_figure([("train", row["metrics"], "train_loss"),
                                           ("validation", row["metrics"], "val_loss")], height=520),
                            key="t_projector_chart", width="stretch")

    live_panel(followed, draw_big, key="t_projector_live", every=2.0, controls=False)
    st.stop()

# ---------------------------------------------------------------------------- 1. progress
st.header("1 · Everyone's progress through the seven stages")
rows = stage.progress_table()
if not rows:
    st.info("No runs yet. When learners start, each gets a row here: their runs per stage, with the "
            "headline figure of each.", icon="💡")
else:
    st.dataframe(rows, hide_index=True, width="stretch", key="t_progress")
    st.caption("Each cell: the learner's newest run of that stage and its headline figure (validation "
               "loss for pre-training, test accuracy for spam, the judge's mean score), then how many more "
               "runs they have there. 'shared' are runs made at a terminal or before class.")
code_behind(*stage.CODE["progress"], title="The code behind this: the headline figure of a run")

# ---------------------------------------------------------------------------- 2. jobs


def draw_jobs(_: str) -> None:
    active = stage.active_jobs()
    if not active:
        st.caption("No job running or queued.")
    for state in active:
        job_controls(state.run_id, key=f"t_job_{state.run_id}")


st.header("2 · Jobs running and queued")
st.caption("The teacher may stop anyone's job; it saves a checkpoint first, so its owner can resume it.")
st.fragment(run_every=polling.every(3) if stage.active_jobs() else None)(draw_jobs)("")

# ---------------------------------------------------------------------------- 3. leaderboard
st.header("3 · Leaderboard at a fixed budget")
minutes = st.number_input("Pre-training budget compared (minutes of the `small` preset)", 0.5, 120.0,
                          float(stage.leaderboard_minutes()), step=0.5, key="t_minutes")
boards = stage.leaderboard(float(minutes))
titles = {"pretrain": f"Validation loss after {minutes:g} min of `small` (lower is better)",
          "classify": "Spam test accuracy (higher is better)", "judge": "Judge's mean score (higher is better)"}
for column, (name, title) in zip(st.columns(3), titles.items()):
    column.markdown(f"**{title}**")
    if boards.get(name):
        column.dataframe(boards[name], hide_index=True, width="stretch", key=f"t_board_{name}")
    else:
        column.caption("No run yet.")
code_behind(*stage.CODE["leaderboard"], title="The code behind this: the leaderboard")

# ---------------------------------------------------------------------------- 4. report card
st.header("4 · A learner's report card")
if not names:
    st.caption("A report card appears once a learner has a run.")
else:
    learner = st.selectbox("Learner", names, key="t_report_learner")
    try:
        card = stage.report_card(learner)
    except stage.GlassBoxError as e:
        show_error(e)
    else:
        st.download_button("Download the report card (HTML; print it to PDF from the browser)", card,
                           file_name=stage.report_filename(learner), mime="text/html", key="t_report_download")
        with st.expander("Preview"):
            st.iframe(card, height=640)  # our own HTML, every learner's text escaped in it
