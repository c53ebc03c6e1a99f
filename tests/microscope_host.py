"""A tiny host page for the microscope panel's AppTests: the run id comes from session_state."""

import streamlit as st

from pages._ui.microscope import microscope_panel

microscope_panel(st.session_state.get("host_run"), key="scope",
                 default_prompt=st.session_state.get("host_prompt", "To be, or not"),
                 template=st.session_state.get("host_template"),
                 default_text=st.session_state.get("host_text"))
