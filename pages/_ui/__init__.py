"""Small Streamlit helpers shared by the pages: headers, errors, run pickers, job controls.

Pages stay thin: widgets → one `core` call → figures. What several pages need (show a job's
state with Stop / Resume, pick a run, show an error without a traceback) lives here once.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import streamlit as st

from core.lab import device, jobs, learners, runs
from core.gpt.errors import GlassBoxError
from pages._ui import polling
from pages._ui.learner import current_actor, owner, show_everyone


@dataclass(frozen=True)
class Stage:
    number: int
    title: str
    file: str
    icon: str
    teaches: str
    run_stages: tuple[str, ...]  # run-store stages this page produces


STAGES = [
    Stage(1, "Text and tokens", "pages/1_Tokenisation.py", "🔤",
          "Text becomes numbers: characters, words and byte-pair merges, and back again.",
          ("tokenizer",)),
    Stage(2, "Attention", "pages/2_Attention.py", "👀",
          "Each token looks at the others: scaled dot-product, causal and multi-head attention.", ()),
    Stage(3, "The GPT architecture", "pages/3_Architecture.py", "🏗️",
          "Embeddings, blocks, layer norm and the output head; every shape and parameter counted.",
          ("import",)),
    Stage(4, "Pre-training", "pages/4_Pretraining.py", "📉",
          "Next-token prediction: watch the loss fall and the samples turn into words.", ("pretrain",)),
    Stage(5, "Classification fine-tuning", "pages/5_Classification.py", "📨",
          "Swap the output head and teach the model to tell spam from ham.", ("classify",)),
    Stage(6, "Instruction fine-tuning", "pages/6_Instructions.py", "💬",
          "Teach the model to answer instructions instead of continuing text.", ("instruct",)),
    Stage(7, "LLM-judge evaluation", "pages/7_Judge.py", "⚖️",
          "A stronger model scores the answers against a frozen rubric.", ("judge",)),
]


# Pages that go beyond the seven stages: listed after the stage they extend.
BEYOND = [
    Stage(6, "Preference tuning (DPO) — beyond the seven", "pages/6b_Preference.py", "🤝",
          "Two answers per instruction, one preferred: DPO raises the preferred one against a frozen copy.",
          ("prefer",)),
    Stage(8, "Chat with your model", "pages/8_Chat.py", "🗨️",
          "Talk to an instruction-tuned or imported model; see the exact prompt its chat template builds.", ()),
]


TEACHER = Stage(9, "Teacher", "pages/9_Teacher.py", "🧑‍🏫",
                "Every learner's progress, the jobs, a leaderboard at one budget, report cards, projector mode.", ())


def page_header(number: int, why: str) -> None:
    stage = STAGES[number - 1]
    st.title(f"{stage.icon} Stage {number}: {stage.title}")
    st.caption(why or stage.teaches)


def no_remote_images(text: str) -> str:
    """Markdown images (`![](url)`) in messages could load outside URLs: show them as text.
    Backticks and other formatting stay, as error messages use them for file names."""
    return str(text).replace("![", "!\\[")


def show_error(error: Exception) -> None:
    """A learner-facing error: the message, never a traceback."""
    if isinstance(error, GlassBoxError):
        st.error(no_remote_images(error), icon="⚠️")
    else:
        st.error(no_remote_images(f"Something went wrong inside Glass Box: {type(error).__name__}: {error}"),
                 icon="🐞")


def escape(text: str) -> str:
    return html.escape(str(text), quote=True)


def run_label(run: runs.Run) -> str:
    if run.error:
        return f"{run.id} — damaged"
    return f"{run.id} — {run.stage}, {run.state}"


def run_picker(stages: str | tuple[str, ...], label: str, key: str,
               require_weights: bool = False, allow_none: bool = False) -> str | None:
    """A selectbox of runs of the given stages (yours first, then newest first); None when there are none."""
    found = [r for r in runs.list_runs(stages) if not r.error]
    if require_weights:
        found = [r for r in found if r.has_weights()]
    ids = learners.mine_first([r.id for r in found], current_actor(), show_everyone())
    if not ids:
        return None
    options = ([None] if allow_none else []) + ids
    labels = {r.id: run_label(r) + _owner_note(r.id) for r in found}
    return st.selectbox(label, options, key=key,
                        format_func=lambda rid: "—" if rid is None else labels.get(rid, rid))


def _owner_note(run_id: str) -> str:
    """" · alice's" beside another learner's run on a classroom server (nothing off one)."""
    who = learners.owner_of(run_id) if learners.classroom_on() else None
    return f" · {who}'s" if who and who != current_actor().name else ""


def run_name_input(container, prefix: str, key: str, label: str = "Run name") -> str:
    """A text input for a new run's name, its default a fresh run id kept in session state.

    A default computed on every rerun changes with the clock, and Streamlit then treats the input
    as a new widget and drops what the learner typed. After starting a run, `del st.session_state[key]`
    gives the next one a fresh default.
    """
    if key not in st.session_state:
        name = owner()  # on a classroom server a run's default name starts with its learner's
        st.session_state[key] = runs.new_run_id(f"{name}-{prefix}" if name else prefix)
    return container.text_input(label, key=key)


def start_job(argv: list[str], run_id: str, env: dict | None = None) -> bool:
    """Start a background job from a button; shows a clear message if it cannot start."""
    try:
        jobs.start_job(argv, run_id, env=env, owner=owner())
    except GlassBoxError as e:
        show_error(e)
        return False
    return True


def start_stage_job(stage, make_settings, run_id: str, page_key: str, name_key: str) -> None:
    """Start a stage's background job from a button: `make_settings()` builds its Settings (a
    refusal of either is shown as a message); the page remembers the run, the next run gets a
    fresh default name, and the page reruns to show the job."""
    try:
        stage.start(make_settings(), run_id, owner=owner())
    except GlassBoxError as e:
        show_error(e)
        return
    st.session_state[page_key] = run_id
    st.session_state.pop(name_key, None)  # a fresh name for the next run
    st.rerun()


STATE_ICONS = {"queued": "⏳", "reserved": "⏳", "running": "🏃", "stopping": "✋", "stopped": "⏸️",
               "finished": "✅", "failed": "❌", "unknown": "❔"}


def job_controls(run_id: str, key: str, resume_env: dict | None = None) -> jobs.JobState | None:
    """The state of a run's job with Stop / Resume buttons; error and log tail if it failed.

    `resume_env` adds variables to a resumed job's environment (e.g. the judge's API key)."""
    try:
        state = jobs.job_state(run_id)
    except GlassBoxError as e:
        show_error(e)
        return None
    icon = STATE_ICONS.get(state.state, "❔")
    actor = current_actor()
    cols = st.columns([4, 1, 1, 1])
    cols[0].markdown(f"{icon} **{escape(run_id)}**{escape(_owner_note(run_id))} — {escape(state.state)}"
                     + (f": {escape(state.message)}" if state.message else ""))
    if not learners.may_change(run_id, actor):
        cols[1].caption("read-only")  # another learner's run: only they and the teacher change it
    elif state.active and cols[1].button("Stop", key=f"{key}-stop", type="primary"):
        _act(lambda: jobs.stop_job(run_id, actor=actor))
    elif state.state in ("stopped", "failed") and state.argv and cols[2].button("Resume", key=f"{key}-resume"):
        _act(lambda: jobs.resume_job(run_id, env=resume_env, actor=actor))
    if not state.active and learners.may_change(run_id, actor):
        with cols[3].popover("Delete"):
            st.write(f"Delete run **{escape(run_id)}** and all its files? This cannot be undone.")
            if st.button("Delete it", key=f"{key}-delete", type="primary"):
                _act(lambda: jobs.delete_run(run_id, actor=actor))
    if state.state == "failed":
        st.error(no_remote_images(state.error or "The job failed."), icon="❌")
        if state.log_tail:
            with st.expander("The end of the job's log"):
                st.code(state.log_tail, language=None)
    return state


def _act(action) -> None:
    """Stop / Resume: a refusal (not yours, still running) is shown; success reruns the page."""
    try:
        action()
    except GlassBoxError as e:
        show_error(e)
    else:
        st.rerun()


def run_ids_with_pending(stages: tuple[str, ...], command: str) -> list[str]:
    """Run ids to offer on a page: jobs of `command` still starting or queued (their run has no
    config.json until the child process has loaded PyTorch) first, then the runs on disk."""
    listed = [r.id for r in runs.list_runs(stages) if not r.error]
    pending = [s.run_id for s in jobs.active_jobs() if s.command == command and s.run_id not in listed]
    return learners.mine_first(pending + listed, current_actor(), show_everyone())


def waiting_to_start(run_id: str) -> bool:
    """True (and says so) while a job's run has no config yet: queued, or still starting."""
    if (runs.run_dir(run_id) / "config.json").exists():
        return False
    st.info("The job is starting (loading PyTorch) or waiting in the queue: its figures appear "
            "here at its first step.", icon="⏳")
    return True


def remembered_run(page_key: str, stages: tuple[str, ...], command: str) -> str | None:
    """The run this page last started (kept in the session), else the newest active job for
    this command, else the newest run of these stages: so a reload finds the job again."""
    run_id = st.session_state.get(page_key)
    if run_id and runs.run_dir(run_id).is_dir():
        return run_id
    actor = current_actor()
    for state in jobs.active_jobs():  # on a classroom server: only your own job is followed
        if state.command == command and (actor.name is None or state.owner == actor.name):
            return state.run_id
    found = learners.mine_first([r.id for r in runs.list_runs(stages) if not r.error], actor, show_everyone())
    return found[0] if found else None


def _job_sidebar_body() -> None:
    # Always exactly one element, so a finished job's line can never linger under a new text.
    lines, others = [], 0
    actor = current_actor()
    for state in jobs.active_jobs():
        if actor.name is not None and not actor.teacher and state.owner != actor.name:
            others += 1  # another learner's job: counted (it may hold the slot), not shown
            continue
        icon = STATE_ICONS.get(state.state, "❔")
        who = f" · {state.owner}" if state.owner and state.owner != actor.name else ""
        lines.append(f"{icon} **{escape(state.run_id)}** · {escape(state.command)}{escape(who)} · "
                     f"{escape(state.state)}"
                     + (f"  \n{escape(state.message)}" if state.message else ""))
    if others:
        lines.append(f"…and {others} job(s) of other learners, running or queued.")
    st.markdown("\n\n".join(lines) if lines else "No job running.")


def configure_app_threads() -> None:
    """The app's own torch work must not fight a training job for the cores (core/lab/device.py)."""
    device.configure_ui_threads(job_running=bool(jobs.active_jobs()))


def job_sidebar() -> None:
    with st.sidebar:
        st.subheader("Jobs")
        # Every 2 s while a job runs; when none does, every 15 s is enough to notice one started
        # from a terminal, and a classroom of idle tabs does not rerun the server 30 times a minute.
        st.fragment(run_every=polling.every(2 if jobs.active_jobs() else 15))(_job_sidebar_body)()
