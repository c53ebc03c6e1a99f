""""The code behind this" on every stage page: each panel shows the live source of what it names.

A panel is an expander titled "🔍 The code behind this…" holding, for each function or class, a
caption with its full dotted name and a code block. The test imports that name from the running
code and compares the listing with `inspect.getsource`: a pasted copy that drifts fails here.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from pages._ui import BEYOND, STAGES

REPO = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^`([\w.]+)`$")


def resolve(dotted: str):
    """`core.gpt.attention.scaled_dot_product_attention` → the object (module, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise LookupError(dotted)


def panels(at: AppTest):
    """(expander, [(dotted name, code)]) for every code-behind panel on the page."""
    found = []
    for expander in at.expander:
        if "code behind" not in expander.label.lower():
            continue
        names = [NAME.match(c.value).group(1) for c in expander.caption if NAME.match(c.value)]
        codes = [c.value for c in expander.code]
        found.append((expander, list(zip(names, codes, strict=True))))
    return found


@pytest.mark.parametrize("stage", STAGES + BEYOND, ids=lambda s: s.file)
def test_every_stage_page_shows_the_live_source_of_what_it_names(stage):
    at = AppTest.from_file(str(REPO / stage.file), default_timeout=90).run()
    assert not at.exception, [e.value for e in at.exception]
    listed = [pair for _, pairs in panels(at) for pair in pairs]
    assert listed, f"{stage.file} has no 'code behind this' panel"
    for dotted, code in listed:
        assert dotted.startswith("core.gpt."), f"{dotted}: panels show the textbook"
        # st.code keeps the text without its final newline.
        assert code == inspect.getsource(resolve(dotted)).rstrip("\n"), f"{dotted}: not the live source"


def test_a_listing_that_is_not_the_live_source_is_caught():
    script = """
import streamlit as st
from core.gpt import attention
with st.expander("🔍 The code behind this"):
    st.caption("`core.gpt.attention.causal_mask`")
    st.code("def causal_mask(): pass  # a pasted copy", language="python")
"""
    at = AppTest.from_string(script, default_timeout=60).run()
    (_, pairs), = panels(at)
    (dotted, code), = pairs
    assert code != inspect.getsource(resolve(dotted)).rstrip("\n")
