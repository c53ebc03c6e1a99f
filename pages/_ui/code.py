""""The code behind this": the live source of the textbook functions that computed a result.

The listing is read from the running code with `inspect.getsource`, never pasted, so what the
learner reads is exactly what ran. Pages pass the functions (or classes) themselves.
"""

from __future__ import annotations

import inspect

import streamlit as st


def qualified_name(obj) -> str:
    """`core.gpt.attention.scaled_dot_product_attention`: where to find it in the repository."""
    return f"{obj.__module__}.{obj.__qualname__}"


def code_behind(*objects, title: str = "The code behind this", expanded: bool = False) -> None:
    """An expander with the source of each function or class in `objects`, under its full name."""
    with st.expander(f"🔍 {title}", expanded=expanded):
        for obj in objects:
            st.caption(f"`{qualified_name(obj)}`")
            st.code(inspect.getsource(obj), language="python")
