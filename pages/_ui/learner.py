"""Who is at this browser: the learner's name on a classroom server, and the teacher's key.

Off a classroom (`classroom = false`, the default) there is one user, who owns everything, and
nothing here asks anything. On a classroom server the first visit asks for a name; the name is
kept in the session, in the URL (`?learner=NAME`, so a teacher can hand out links) and in a
cookie, so a reload or a new tab finds it again. No passwords: the teacher alone has a key,
`GLASSBOX_TEACHER_KEY`, typed on the teacher's page and kept only in the session.
"""

from __future__ import annotations

import json

import streamlit as st

from core.gpt.errors import GlassBoxError
from core.lab import learners, server_settings
from core.lab.learners import Actor

NAME_KEY, TEACHER_KEY, EVERYONE_KEY = "learner_name", "learner_teacher", "learner_everyone"
COOKIE = "glassbox_learner"


def apply_server_settings() -> None:
    """Read `.streamlit/classroom.toml` into the environment; a wrong file stops the app, saying why."""
    try:
        server_settings.apply()
    except GlassBoxError as e:
        st.error(f"The server's settings file is wrong, so the app will not start: {e}", icon="⚠️")
        st.stop()


def _remembered_name() -> str | None:
    for found in (st.query_params.get("learner"), st.context.cookies.get(COOKIE)):
        try:
            return learners.learner_name(found) if found else None
        except learners.LearnerError:
            continue
    return None


def current_actor() -> Actor:
    """The person at this browser: `Actor.local()` off a classroom; else their name and role."""
    if not learners.classroom_on():
        return Actor.local()
    if NAME_KEY not in st.session_state and (name := _remembered_name()):
        st.session_state[NAME_KEY] = name
    return Actor(st.session_state.get(NAME_KEY), teacher=bool(st.session_state.get(TEACHER_KEY)))


def owner() -> str | None:
    """The name new runs, jobs and uploads are recorded under (None off a classroom)."""
    return current_actor().name


def show_everyone() -> bool:
    """Whether other learners' runs are listed too (read-only): the sidebar's opt-in."""
    return not learners.classroom_on() or bool(st.session_state.get(EVERYONE_KEY))


def _remember(name: str) -> None:
    st.session_state[NAME_KEY] = name
    st.query_params["learner"] = name
    # A cookie for this origin, a year long, set from a same-origin component frame.
    st.iframe(f"<script>document.cookie = {json.dumps(f'{COOKIE}={name}')} + "
              "'; path=/; max-age=31536000; SameSite=Strict';</script>", height=1)  # name: checked, [a-z0-9_-]


def learner_gate() -> bool:
    """On a classroom server: the sidebar's "you are …" and True, or False on a first visit, when
    the app shows only `name_form` until a name is chosen."""
    if not learners.classroom_on():
        return True
    actor = current_actor()
    if actor.name:
        if st.session_state.pop("learner_new", False):
            _remember(actor.name)
        with st.sidebar:
            st.markdown(f"You are **{actor.name}**" + (" · teacher" if actor.teacher else ""))
            st.toggle("Show everyone's runs (read-only)", key=EVERYONE_KEY)
            if st.button("I am someone else", key="learner_change"):
                for key in (NAME_KEY, TEACHER_KEY):
                    st.session_state.pop(key, None)
                st.query_params.pop("learner", None)
                st.iframe(f"<script>document.cookie = '{COOKIE}=; path=/; max-age=0';</script>", height=1)
                st.rerun()
        return True
    return False


def name_form() -> None:
    """The first visit's page on a classroom server: pick a name."""
    st.title("🔍 Glass Box LLM")
    st.write("This server is shared by a class. Pick a name: your runs, uploads and jobs are kept "
             "under it, and only you and the teacher can stop or delete them. No password.")
    with st.form("learner_form"):
        typed = st.text_input("Your name", max_chars=24, placeholder="e.g. ada")
        chosen = st.form_submit_button("Start", type="primary")
    if chosen:
        try:
            st.session_state[NAME_KEY] = learners.learner_name(typed)
        except learners.LearnerError as e:
            st.error(str(e), icon="⚠️")
        else:
            st.session_state["learner_new"] = True
            st.rerun()


def teacher_unlock(container) -> bool:
    """The teacher's key field (classroom only); True once this session is the teacher's."""
    actor = current_actor()
    if actor.teacher:
        return True
    if not learners.teacher_key_set():
        container.warning("This server has no teacher's key: start it with GLASSBOX_TEACHER_KEY set.", icon="🔒")
        return False
    typed = container.text_input("Teacher's key", type="password", key="teacher_key_typed")
    if typed and learners.is_teacher_key(typed):
        st.session_state[TEACHER_KEY] = True
        st.rerun()
    if typed:
        container.error("That is not the teacher's key.", icon="🔒")
    return False
