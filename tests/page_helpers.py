"""Helpers shared by the page tests (streamlit.testing.v1.AppTest)."""

from streamlit.testing.v1 import AppTest


def run_page(path: str, timeout: float = 30) -> AppTest:
    """Run a page script once and fail on any exception it shows."""
    at = AppTest.from_file(path, default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    return at


def all_text(at: AppTest) -> str:
    """Everything a learner reads on the page: markdown, headers, captions and every message box."""
    parts = [m.value for m in at.markdown] + [i.value for i in at.info] + [e.value for e in at.error]
    parts += [c.value for c in at.caption] + [h.value for h in at.header] + [h.value for h in at.subheader]
    parts += [w.value for w in at.warning] + [s.value for s in at.success]
    return "\n".join(str(p) for p in parts)
