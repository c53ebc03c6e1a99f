"""Glass Box LLM — the entry point: `streamlit run app.py`.

Builds the navigation (Home + one page per stage) and the sidebar that shows the running job on
every page. Each page is a thin script in `pages/`; everything it computes comes from `core`.
"""

import streamlit as st

from pages._ui import BEYOND, STAGES, TEACHER, configure_app_threads, job_sidebar
from pages._ui.learner import apply_server_settings, learner_gate, name_form

st.set_page_config(page_title="Glass Box LLM", page_icon="🔍", layout="wide")
apply_server_settings()  # .streamlit/classroom.toml: a shared server's settings

home = st.Page("pages/home.py", title="Home", icon="🏠", default=True)
stage_pages = [st.Page(s.file, title=f"{s.number}. {s.title}", icon=s.icon)
               for s in STAGES]
# URL paths are Streamlit's own, from the file names (/Tokenisation, ...): custom lowercase
# paths made a deep link's first load flash "Page not found", as pages/ is also scanned by name.
preference, chat = (st.Page(p.file, title=p.title, icon=p.icon) for p in BEYOND)
stage_pages.insert(6, preference)  # between instruction tuning and the judge, marked "beyond"
teacher = st.Page(TEACHER.file, title=TEACHER.title, icon=TEACHER.icon)
if learner_gate():
    navigation = st.navigation({"Glass Box LLM": [home], "Build a GPT, stage by stage": stage_pages,
                                "Use your model": [chat], "Classroom": [teacher]})
    configure_app_threads()
    job_sidebar()
else:  # a classroom server's first visit: a name before anything else
    navigation = st.navigation([st.Page(name_form, title="Who are you?", icon="🔍")], position="hidden")
navigation.run()
