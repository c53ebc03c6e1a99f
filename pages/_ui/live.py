"""One live-run panel: a run's job controls and its figures, redrawn while the job runs.

A training job is a child process writing `metrics.jsonl`; the page only polls. While the job is
active the panel is a fragment that reruns every `every` seconds (only the panel, not the page);
when the job ends, one full rerun draws the page's results below and the polling stops. A
finished run is drawn once and left alone.
"""

from __future__ import annotations

from typing import Callable

import streamlit as st

from core.gpt.errors import GlassBoxError
from core.lab import jobs
from pages._ui import job_controls
from pages._ui import polling as poll


def live_panel(run_id: str, draw: Callable[[str], None], key: str, every: float = 1.0,
               resume_env: dict | None = None, controls: bool = True) -> None:
    """Job controls for `run_id` (Stop / Resume) and `draw(run_id)`, live while the job runs."""
    try:
        polling = jobs.job_state(run_id).active
    except GlassBoxError:
        polling = False

    def body() -> None:
        state = job_controls(run_id, key=f"{key}-job", resume_env=resume_env) if controls else None
        draw(run_id)
        if polling and not (state.active if state else jobs.job_state(run_id).active):
            st.rerun(scope="app")  # the job just ended: draw the results once, stop polling

    body.__qualname__ = f"live_panel.{key}"  # one fragment identity per panel
    st.fragment(run_every=poll.every(every) if polling else None)(body)()
