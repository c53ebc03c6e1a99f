"""One chart library for every curve (Plotly), one downsample, one loss chart.

Long loss histories are downsampled before drawing: a chart of 100k points re-sent on every
refresh is what makes a long session slow and leaky.
"""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

MAX_POINTS = 400


def downsample(rows: list[dict], max_points: int = MAX_POINTS) -> list[dict]:
    """At most `max_points` rows, evenly spaced, always keeping the first and the last."""
    if len(rows) <= max_points:
        return list(rows)
    stride = (len(rows) - 1) / (max_points - 1)
    return [rows[round(i * stride)] for i in range(max_points)]


def curves_figure(series: list[tuple[str, list[dict], str]], x_key: str = "step", height: int = 320,
                  y_title: str = "loss", percent: bool = False, marker_step: int | None = None,
                  band: tuple[list[float], list[float], list[float]] | None = None) -> go.Figure:
    """Lines of (name, rows, y_key); rows lacking the key are skipped. `band` = (x, low, high) is a
    shaded reference band drawn behind the curves; `marker_step` draws a vertical line there."""
    fig = go.Figure()
    if band is not None:
        xs, low, high = band
        fig.add_trace(go.Scatter(x=list(xs) + list(xs)[::-1], y=list(high) + list(low)[::-1], fill="toself",
                                 fillcolor="rgba(148,163,184,0.25)", line=dict(width=0), hoverinfo="skip",
                                 name="expected"))
    for name, rows, y_key in series:
        points = downsample([r for r in rows if r.get(y_key) is not None])
        fig.add_trace(go.Scatter(x=[r.get(x_key) for r in points], y=[r[y_key] for r in points],
                                 mode="lines+markers" if len(points) < 30 else "lines", name=name))
    if marker_step is not None:
        fig.add_vline(x=marker_step, line_dash="dot", line_color="#16a34a",
                      annotation_text="kept weights", annotation_position="top")
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=30, b=10), xaxis_title=x_key,
                      yaxis_title=y_title, legend=dict(orientation="h", y=1.12))
    if percent:
        fig.update_yaxes(tickformat=".0%")
    return fig


def expected_vs_yours(expected: dict) -> None:
    """Under a loss chart: where the grey band comes from, and each health check that has something
    to say (core.lab.references.expected_vs_yours)."""
    ref = expected["reference"]
    if ref:
        st.caption(f"Grey band: the reference run of this start and recipe (validation loss ±{ref['band']:.0%}), "
                   f"measured on {ref['machine']}: `{ref['command']}`.")
    for message in expected["health"]:
        st.warning(message, icon="🩺")
