"""Plotly figures of stages 2 and 3: labelled heatmaps, the layer × head grid, the parameter bar,
the top-10 bars, and RoPE's rotating arrows.

Labels are user text and Plotly renders a little HTML in labels, so every label is escaped here.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

FONT = 18  # large enough to read on a projector
COMPONENT_COLOURS = {"token embedding": "#4C78A8", "position embedding": "#9ECAE9", "attention": "#F58518",
                     "feed-forward": "#54A24B", "layer norms": "#B279A2", "output head": "#E45756"}


def readable(token: str) -> str:
    """Make spaces and line breaks visible in a token label."""
    shown = token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")
    return shown if shown else "∅"


def unique_labels(tokens: list[str]) -> list[str]:
    """Table headers must be distinct: a repeated token gets its position added."""
    shown = [readable(t) for t in tokens]
    return [f"{s} ({i})" if shown.count(s) > 1 else s for i, s in enumerate(shown)]


def as_array(tensor) -> np.ndarray:
    return tensor.detach().float().numpy() if hasattr(tensor, "detach") else np.asarray(tensor, dtype=float)


def heatmap(matrix, rows: list[str], cols: list[str], *, zmin=None, zmax=None, colorscale="RdBu",
            digits: int = 2, height: int | None = None, numbers: bool = True) -> go.Figure:
    """One heatmap with token labels; -inf (masked) cells are left blank and marked −∞."""
    values = as_array(matrix)
    masked = np.isneginf(values)
    shown = np.where(masked, np.nan, values)
    text = np.where(masked, "−∞", np.vectorize(lambda x: f"{x:.{digits}f}")(np.nan_to_num(values)))
    fig = go.Figure(go.Heatmap(
        z=shown, x=list(range(len(cols))), y=list(range(len(rows))), zmin=zmin, zmax=zmax,
        colorscale=colorscale, reversescale=colorscale == "RdBu", zmid=0 if colorscale == "RdBu" else None,
        text=text if numbers else None, texttemplate="%{text}" if numbers else None,
        textfont={"size": FONT - 2}, customdata=[[f"{html.escape(r)} → {html.escape(c)}" for c in cols] for r in rows],
        hovertemplate="%{customdata}: %{z:.3f}<extra></extra>", showscale=False))
    fig.update_xaxes(tickvals=list(range(len(cols))), ticktext=[html.escape(c) for c in cols],
                     tickfont={"size": FONT}, side="top")
    fig.update_yaxes(tickvals=list(range(len(rows))), ticktext=[html.escape(r) for r in rows],
                     tickfont={"size": FONT}, autorange="reversed")
    fig.update_layout(height=height or 90 + 48 * len(rows), margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def grid_figure(maps: np.ndarray, layers: list[int], labels: list[str]) -> go.Figure:
    """Small heatmaps: one row per layer, one column per head, token labels on the edges."""
    n_heads, T = maps.shape[1], maps.shape[2]
    fig = make_subplots(rows=len(layers), cols=n_heads, horizontal_spacing=0.02, vertical_spacing=0.03,
                        subplot_titles=[f"L{layer} H{head}" for layer in layers for head in range(n_heads)])
    ticks = [html.escape(t) for t in labels]
    small = max(8, min(14, 240 // max(T, 1)))
    hover = [[f"{ticks[i]} → {ticks[j]}" for j in range(T)] for i in range(T)]
    for r, layer in enumerate(layers, start=1):
        for head in range(n_heads):
            fig.add_trace(go.Heatmap(z=maps[layer, head], zmin=0, zmax=1, colorscale="Blues", showscale=False,
                                     customdata=hover, hovertemplate="%{customdata}: %{z:.2f}<extra></extra>"),
                          row=r, col=head + 1)
    fig.update_xaxes(tickvals=list(range(T)), ticktext=ticks, tickfont={"size": small}, showticklabels=False)
    fig.update_yaxes(tickvals=list(range(T)), ticktext=ticks, tickfont={"size": small}, showticklabels=False,
                     autorange="reversed")
    for r in range(1, len(layers) + 1):  # labels on the left edge and along the bottom row
        fig.update_yaxes(showticklabels=True, row=r, col=1)
    for c in range(1, n_heads + 1):
        fig.update_xaxes(showticklabels=True, row=len(layers), col=c)
    cell = max(110, min(220, 1100 // n_heads))
    fig.update_layout(height=80 + cell * len(layers), margin={"l": 10, "r": 10, "t": 40, "b": 10})
    fig.update_annotations(font_size=FONT - 4)
    return fig


def parameter_bar(parts: dict[str, int]) -> go.Figure:
    """One stacked bar: where the parameters live."""
    total = max(1, sum(parts.values()))
    fig = go.Figure()
    for part, count in parts.items():
        fig.add_trace(go.Bar(x=[count], y=["parameters"], name=part, orientation="h",
                             marker_color=COMPONENT_COLOURS.get(part),
                             hovertemplate=f"{part}: %{{x:,}} ({100 * count / total:.1f}%)<extra></extra>"))
    fig.update_layout(barmode="stack", height=190, margin=dict(l=10, r=10, t=30, b=10), font_size=FONT - 4,
                      title="Where the parameters live", legend=dict(orientation="h", y=-0.4))
    return fig


def top_bars(values, labels: list[str], title: str, axis: str) -> go.Figure:
    """Horizontal bars, largest on top (the top-10 next tokens)."""
    fig = go.Figure(go.Bar(x=list(values)[::-1], y=[html.escape(label, quote=False) for label in labels][::-1],
                           orientation="h", marker_color="#4C78A8"))
    fig.update_layout(title=title, height=380, margin=dict(l=10, r=10, t=40, b=10), font_size=FONT - 4,
                      xaxis_title=axis)
    return fig


def compare_bars(rows: list[dict], names: list[str]) -> go.Figure:
    """Each numeric figure of two configurations as a pair of bars, relative to the first."""
    fig = go.Figure()
    numeric = [r for r in rows if isinstance(r[names[0]], (int, float))]
    for name in names:
        fig.add_trace(go.Bar(name=html.escape(name), x=[r["figure"] for r in numeric],
                             y=[r[name] / max(1, r[names[0]]) for r in numeric],
                             customdata=[f"{r[name]:,}" for r in numeric],
                             hovertemplate="%{x}: %{customdata}<extra></extra>"))
    fig.update_layout(barmode="group", height=320, margin=dict(l=10, r=10, t=30, b=10), font_size=FONT - 4,
                      yaxis_title=f"relative to {html.escape(names[0])}", legend=dict(orientation="h", y=1.15))
    return fig


def rope_arrows(pairs: dict, query_position: int, key_position: int) -> go.Figure:
    """The first pair of numbers of q and k as arrows, before (dotted) and after rotation."""
    fig = go.Figure()
    styles = [("q", "q at position 0", "#F58518", "dot"), ("k", "k at position 0", "#4C78A8", "dot"),
              ("q_rotated", f"q at position {query_position}", "#F58518", "solid"),
              ("k_rotated", f"k at position {key_position}", "#4C78A8", "solid")]
    for key, name, colour, dash in styles:
        x, y = pairs[key]
        fig.add_trace(go.Scatter(x=[0, x], y=[0, y], mode="lines+markers", name=name,
                                 line=dict(color=colour, dash=dash, width=3), marker=dict(size=[0, 10])))
    reach = 1.15 * max(max(abs(v) for v in pair) for pair in pairs.values())
    fig.update_xaxes(range=[-reach, reach], zeroline=True)
    fig.update_yaxes(range=[-reach, reach], zeroline=True, scaleanchor="x")
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=30, b=10), font_size=FONT - 4,
                      title="Pair 0 of q and k (the fastest hand of the clock)")
    return fig
