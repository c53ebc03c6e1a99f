"""The time slider: travel back through a run's training snapshots (pages 4, 5 and 6).

    history_panel(run_id, key="pt_history")

For the chosen snapshot it redraws a sample continuing a fixed prompt and the per-token loss of that
text (for a classifier: its verdict on a fixed message, after each of its tokens), an attention map,
the embedding map (PCA of the token embeddings, with a search box and the nearest neighbours by
cosine) and the position embeddings' similarity. While the run's job is
active, the panel re-lists the snapshots every few seconds, so new steps appear on the slider.
"""

from __future__ import annotations

import html

import plotly.graph_objects as go
import streamlit as st

from core.gpt.errors import GlassBoxError
from core.lab import jobs, runs, snapshots
from core.stages import snapshots as history
from pages._ui import polling, show_error
from pages._ui.code import code_behind

MAP_LABELS = 300  # most token labels written on the map (all points are drawn; hover shows every label)


@st.cache_data(max_entries=16, show_spinner=False)
def _views(run_id: str, step: int | None, query: str, stamp: float) -> dict:
    return history.views(run_id, step, query or None)  # `stamp` (the file's mtime) renews a replaced file


def _stamp(run_id: str, step: int | None) -> float:
    path = runs.run_dir(run_id) / (f"{snapshots.FOLDER}/{snapshots.file_name(step)}" if step is not None
                                   else "model.safetensors")
    return path.stat().st_mtime if path.exists() else 0.0


def map_figure(v: dict) -> go.Figure:
    """The embedding map: every token a point; the searched token and its neighbours stand out."""
    xs, ys = zip(*v["map"]) if v["map"] else ((), ())
    labels = v["labels"]
    near = {label for label, _ in v["neighbours"] or []}
    colours = ["#dc2626" if i == v.get("query_id") else "#2563eb" if labels[i] in near else "#94a3b8"
               for i in range(len(labels))]
    text = [lab if (len(labels) <= MAP_LABELS or lab in near) else "" for lab in labels]
    fig = go.Figure(go.Scatter(x=xs, y=ys, mode="markers+text", text=text, textposition="top center",
                               hovertext=[html.escape(lab) for lab in labels], hoverinfo="text",
                               marker=dict(color=colours, size=7)))
    ex = v["explained"] + [0.0, 0.0]
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=10, b=10), showlegend=False,
                      xaxis_title=f"PC 1 ({ex[0]:.0%} of the variance)", yaxis_title=f"PC 2 ({ex[1]:.0%})")
    return fig


def heatmap(z, labels, title: str, height: int = 360) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=labels, colorscale="Blues"))
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=30, b=10), title=title,
                      yaxis_autorange="reversed")
    return fig


def token_bars(values, tokens, title: str, **layout) -> go.Figure:
    """One bar per token: `values[i]` belongs to `tokens[i]`."""
    bars = go.Figure(go.Bar(x=list(range(len(values))), y=values, hovertext=[html.escape(t) for t in tokens]))
    bars.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), title=title,
                       xaxis=dict(tickvals=list(range(len(tokens))), ticktext=tokens), **layout)
    return bars


def _headline(v: dict) -> str:
    step = v["step"] if v["step"] is not None else "final"
    if v.get("kind") == "classifier":
        p = v["probabilities"]
        return (f"**Verdict at step {step}:** {html.escape(v['prompt'])} → **{html.escape(v['label'])}** "
                f"(" + ", ".join(f"{html.escape(k)} {p[k]:.0%}" for k in v["classes"]) + ")")
    return (f"**Sample at step {step}:** `{html.escape(v['prompt']).replace(chr(10), ' ')}` → "
            f"{html.escape(v['continuation'])}")


def _draw(run_id: str, key: str, v: dict) -> None:
    st.markdown(_headline(v))
    left, right = st.columns(2)
    if v.get("kind") == "classifier":  # the verdict on each prefix: where the model makes up its mind
        bars = token_bars(v["by_position"], v["tokens"], f"P({v['classes'][-1]}) after each token",
                          yaxis_range=[0, 1])
    else:  # the loss of token i+1 given tokens 0..i
        bars = token_bars(v["losses"], v["tokens"][1:], "loss of each next token (nats)")
    left.plotly_chart(bars, key=f"{key}_losses", width="stretch")
    layers = len(v["attention"])
    layer = right.selectbox("Attention of layer", range(layers), index=layers - 1, key=f"{key}_layer",
                            format_func=lambda i: f"block {i + 1} (mean of its heads)")
    heads = v["attention"][layer]
    mean = [[sum(h[r][c] for h in heads) / len(heads) for c in range(len(heads[0][r]))] for r in range(len(heads[0]))]
    right.plotly_chart(heatmap(mean, v["tokens"], "who looks at whom"), key=f"{key}_attention", width="stretch")
    st.plotly_chart(map_figure(v), key=f"{key}_map", width="stretch")
    if v["query_error"]:
        st.warning(v["query_error"], icon="🔎")
    elif v["neighbours"]:
        st.markdown("Nearest by cosine: " + ", ".join(f"`{html.escape(t)}` {c:.2f}" for t, c in v["neighbours"]))
    if v["positions"] is not None:
        n = len(v["positions"])
        st.plotly_chart(heatmap(v["positions"], list(range(n)), "cosine similarity of the position vectors", 320),
                        key=f"{key}_positions", width="stretch")
    code_behind(*history.CODE["embedding map"], *history.CODE["positions"])


def history_panel(run_id: str, key: str) -> None:
    """The time slider and the views of the chosen snapshot of run `run_id` (`key`: unique per page)."""
    try:
        active = jobs.job_state(run_id).active
    except GlassBoxError:
        active = False

    def body() -> None:
        if not (runs.run_dir(run_id) / "config.json").exists():
            return  # still starting or queued: the live panel says so
        try:
            listed = history.results(run_id)
        except GlassBoxError as e:
            show_error(e)
            return
        if listed["note"]:
            st.info(listed["note"], icon="🕰️")
        for line in listed["skipped"]:
            st.warning(line, icon="⚠️")
        if not listed["steps"] and not listed["has_weights"]:
            if not listed["note"]:  # a note has already said why there is nothing to travel through
                st.caption("The time slider appears once the run has saved weights.")
            return
        steps = listed["steps"] or [None]
        if len(steps) > 1:
            step = st.select_slider("Training step", steps, value=steps[-1], key=f"{key}_step")
        else:
            step = steps[0]
        query = st.text_input("Find a token on the map", key=f"{key}_query", placeholder="e.g. e, T, or the")
        try:
            v = _views(run_id, step, query.strip("\n"), _stamp(run_id, step))
        except GlassBoxError as e:
            show_error(e)
            return
        _draw(run_id, key, v)

    body.__qualname__ = f"history_panel.{key}"
    st.fragment(run_every=polling.every(3) if active else None)(body)()
