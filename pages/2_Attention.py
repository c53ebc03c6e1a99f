"""Stage 2 — Attention: how each token decides which other tokens to listen to.

Part 1 works through attention by hand on a six-word sentence: every matrix as a table and a
heatmap. Part 2 opens a trained model and shows where each of its heads looks.
The maths lives in core/attention.py; this page only draws it.
"""

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.gpt import attention as att
from core.lab import runs
from core.gpt.errors import GlassBoxError
from pages._ui import page_header, run_picker, show_error

FONT = 18  # large enough to read on a projector
MODEL_STAGES = ("pretrain", "instruct", "import")  # runs whose output layer is a language model
GRID_LIMIT = 32  # most small heatmaps drawn at once; pick layers for bigger models


# ------------------------------------------------------------------------------ drawing helpers


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


def table(matrix, rows: list[str], cols: list[str], digits: int = 2) -> None:
    frame = pd.DataFrame(as_array(matrix), index=rows, columns=cols)
    st.dataframe(frame.style.format(f"{{:.{digits}f}}"), width="stretch")


def heatmap(matrix, rows: list[str], cols: list[str], *, zmin=None, zmax=None, colorscale="RdBu",
            digits: int = 2, height: int | None = None, numbers: bool = True) -> go.Figure:
    """One heatmap with token labels; -inf (masked) cells are left blank and marked −∞.

    Labels are user text, and plotly renders a little HTML in labels, so they are escaped.
    """
    values = as_array(matrix)
    masked = np.isneginf(values)
    shown = np.where(masked, np.nan, values)
    text = np.where(masked, "−∞", np.vectorize(lambda x: f"{x:.{digits}f}")(np.nan_to_num(values)))
    fig = go.Figure(go.Heatmap(
        z=shown, x=list(range(len(cols))), y=list(range(len(rows))), zmin=zmin, zmax=zmax,
        colorscale=colorscale, reversescale=colorscale == "RdBu", zmid=0 if colorscale == "RdBu" else None,
        text=text if numbers else None, texttemplate="%{text}" if numbers else None,
        textfont={"size": FONT - 2}, customdata=[[f"{html.escape(r)} → {html.escape(c)}" for c in cols] for r in rows],
        hovertemplate="%{customdata}: %{z:.3f}<extra></extra>",
        showscale=False,
    ))
    fig.update_xaxes(tickvals=list(range(len(cols))), ticktext=[html.escape(c) for c in cols],
                     tickfont={"size": FONT}, side="top")
    fig.update_yaxes(tickvals=list(range(len(rows))), ticktext=[html.escape(r) for r in rows],
                     tickfont={"size": FONT}, autorange="reversed")
    fig.update_layout(height=height or 90 + 48 * len(rows), margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return fig


def step(title: str, explanation: str, matrix, rows, cols, key: str, **heat) -> None:
    """One step of the worked example: a sentence of why, then the numbers and their picture."""
    st.markdown(f"#### {title}")
    st.markdown(explanation)
    left, right = st.columns([1, 1])
    with left:
        table(matrix, rows, cols, heat.get("digits", 2))
    with right:
        st.plotly_chart(heatmap(matrix, rows, cols, **heat), key=key, width="stretch")


# ------------------------------------------------------------------------------ part 1


def worked_example() -> None:
    st.header("1 · Attention by hand")
    st.markdown(
        "Each word asks a **query** (what am I looking for?), offers a **key** (what do I contain?) "
        "and carries a **value** (what I pass on). A word's new vector is an average of all values, "
        "weighted by how well its query matches each key. Move the controls: every number below "
        "is recomputed, and each one can be checked by hand."
    )
    text = st.text_input("A short sentence (split on spaces)", att.EXAMPLE_SENTENCE, key="toy_text")
    c1, c2, c3 = st.columns(3)
    seed = c1.slider("Seed (random embeddings and weights)", 0, 50, 0, key="toy_seed")
    d_head = c2.slider("Head dimension d", 1, 8, 4, key="toy_dhead")
    n_heads = c3.slider("Number of heads", 1, 4, 1, key="toy_heads")
    c4, c5, c6 = st.columns(3)
    causal = c4.toggle("Causal mask (hide future words)", value=False, key="toy_causal")
    dropout = c5.slider("Attention dropout", 0.0, 0.8, 0.0, 0.1, key="toy_dropout")
    d_model = c6.slider("Embedding size", 2, 8, 4, key="toy_dmodel")

    try:
        s = att.attention_steps(text, seed=seed, d_model=d_model, d_head=d_head, n_heads=n_heads,
                                causal=causal, dropout_p=dropout)
    except GlassBoxError as e:
        show_error(e)
        return

    words = unique_labels(s["tokens"])
    embed_cols = [f"e{i}" for i in range(d_model)]
    dims = [f"d{i}" for i in range(d_head)]
    h = 0
    if n_heads > 1:
        h = st.radio("Show head", list(range(n_heads)), horizontal=True, key="toy_head",
                     format_func=lambda i: f"head {i}")
        st.caption("Every head has its own W_q, W_k, W_v, so it scores the words differently.")

    step("0 · Embeddings X", "Each word is a vector from a (seeded, random) embedding table, rounded "
         "to one decimal. A repeated word gets the same vector.", s["X"], words, embed_cols, "toy_x")

    st.markdown("#### 1 · Queries, keys and values")
    st.markdown("Three matrix products with the head's weights: **Q = X·W_q**, **K = X·W_k**, **V = X·W_v**.")
    for column, name in zip(st.columns(3), ["Q", "K", "V"]):
        with column:
            st.markdown(f"**{name}**")
            table(s[name][h], words, dims)
            st.plotly_chart(heatmap(s[name][h], words, dims), key=f"toy_{name}", width="stretch")

    step("2 · Scores = Q · Kᵀ", "Row *i*, column *j*: how well word *i*'s query matches word *j*'s key "
         "(a dot product).", s["scores"][h], words, words, "toy_scores")
    check_by_hand(s, h, words)

    step(f"3 · Scaled scores = scores × 1/√{d_head} = scores × {s['scale']:.3f}",
         "Dot products grow with the dimension; scaling keeps them near 1 so that softmax does not "
         "pick a single winner too early.", s["scaled"][h], words, words, "toy_scaled")

    if causal:
        step("4 · Causal mask", "A GPT predicts the next word, so a word may not look ahead: scores of "
             "later words become −∞ (the shaded triangle).", s["masked"][h], words, words, "toy_masked")
    else:
        st.markdown("#### 4 · Causal mask")
        st.info("Off: every word may look at every word. Switch on *Causal mask* to see what a GPT does.")

    step("5 · Weights = softmax(scaled scores)", "Each row becomes positive numbers that add up to 1: "
         "the share of attention word *i* gives to each word.", s["weights"][h], words, words,
         "toy_weights", zmin=0, zmax=1, colorscale="Blues", digits=3)
    if dropout > 0:
        step(f"6 · Dropout p = {dropout:.1f}", f"During training some weights are zeroed at random and "
             f"the rest multiplied by 1/(1−p) = {1 / (1 - dropout):.2f}, so the model cannot rely on one "
             "connection.", s["dropped"][h], words, words, "toy_dropped", zmin=0, colorscale="Blues", digits=3)
    else:
        st.markdown("#### 6 · Dropout")
        st.info("Dropout is 0: the weights are used as they are (as at inference time).")

    step("7 · Context = weights · V", "Each word's new vector: its weighted average of the value vectors.",
         s["context"][h], words, dims, "toy_context")
    if n_heads > 1:
        st.markdown(f"The {n_heads} heads' contexts are put side by side: each word leaves attention "
                    f"with {n_heads} × {d_head} = {n_heads * d_head} numbers (a final linear layer then mixes them).")


def check_by_hand(s: dict, h: int, words: list[str]) -> None:
    """Spell out one score as the sum of products, so the learner sees there is no magic."""
    with st.expander("Check one score by hand"):
        a, b = st.columns(2)
        i = a.selectbox("Query word", range(len(words)), format_func=lambda n: words[n], key="toy_qi")
        j = b.selectbox("Key word", range(len(words)), index=min(1, len(words) - 1),
                        format_func=lambda n: words[n], key="toy_kj")
        x, w_q = s["X"][i].tolist(), s["W_q"][h, :, 0].tolist()
        q_first = " + ".join(f"({a_:.1f}×{b_:.1f})" for a_, b_ in zip(x, w_q))
        q, k = s["Q"][h, i].tolist(), s["K"][h, j].tolist()
        terms = " + ".join(f"({a_:.2f}×{b_:.2f})" for a_, b_ in zip(q, k))
        score = sum(a_ * b_ for a_, b_ in zip(q, k))
        row = s["masked"][h, i].tolist()
        visible = [(n, v) for n, v in enumerate(row) if v != float("-inf")]
        total = sum(np.exp(v) for _, v in visible)
        weight = np.exp(row[j]) / total if row[j] != float("-inf") else 0.0
        st.code(
            f"Q[{words[i]}, d0] = x · W_q[:, 0] = {q_first} = {q[0]:.2f}\n"
            f"score  = Q[{words[i]}] · K[{words[j]}] = {terms}\n       = {score:.3f}\n"
            f"scaled = {score:.3f} × {s['scale']:.3f} = {score * s['scale']:.3f}\n"
            f"weight = exp(scaled) / sum of exp over the row's {len(visible)} visible scores = {weight:.3f}",
            language=None)


# ------------------------------------------------------------------------------ part 2


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def load_model(run_id: str, stamp: float):
    """The model and tokenizer of a run; `stamp` (weights file time) reloads a retrained run."""
    from core.lab.models import load_model_run

    model, tokenizer, _ = load_model_run(run_id)
    return model.eval(), tokenizer


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


def trained_model() -> None:
    st.header("2 · Where a trained model looks")
    st.markdown("A trained GPT has several layers of several heads. Each head learnt its own habit: "
                "some look at the previous token, some at the first token, some spread out.")
    try:
        import core.gpt.model  # noqa: F401  (written in stage 3)
    except ImportError:
        st.info("The model code is not available yet: train a model on stage 4 first.")
        return
    run_id = run_picker(MODEL_STAGES, "Model run", key="model_run", require_weights=True)
    if run_id is None:
        st.info("No trained model yet: train a model on stage 4 first (or import GPT-2 weights), "
                "then come back to see its attention.")
        return

    text = st.text_area("Text to read", "To be, or not to be, that is the question.", key="model_text")
    max_tokens = st.slider("Tokens shown (at most)", 4, 64, 24, key="model_tokens")
    try:
        weights_file = runs.open_run(run_id).file("model.safetensors")
        model, tokenizer = load_model(run_id, weights_file.stat().st_mtime)
        tokens, maps = att.model_attention_maps(model, tokenizer, text, max_tokens=max_tokens)
    except GlassBoxError as e:
        show_error(e)
        return
    labels = [readable(t) for t in tokens]  # plots place labels by position: repeats are fine
    maps_np = maps.numpy()
    n_layers, n_heads = maps_np.shape[:2]
    st.caption(f"{len(tokens)} tokens · {n_layers} layers × {n_heads} heads. Row = the token reading, "
               "column = the token it looks at; dark = much attention.")

    layers = list(range(n_layers))
    if n_layers * n_heads > GRID_LIMIT:
        most = max(1, GRID_LIMIT // n_heads)
        layers = st.multiselect("Layers to show", layers, default=layers[:most], key="model_layers",
                                max_selections=most) or layers[:1]
    st.plotly_chart(grid_figure(maps_np, sorted(layers), labels), key="model_grid", width="stretch")

    st.subheader("One head, enlarged")
    a, b = st.columns(2)
    layer = a.selectbox("Layer", range(n_layers), key="model_layer")
    head = b.selectbox("Head", range(n_heads), key="model_head")
    st.plotly_chart(heatmap(maps_np[layer, head], labels, labels, zmin=0, zmax=1, colorscale="Blues",
                            numbers=len(labels) <= 14, height=160 + 34 * len(labels)),
                    key="model_big", width="stretch")

    st.subheader("Where does each head look?")
    st.markdown("**Focus** is 1 when a head always looks at one token and 0 when it spreads evenly "
                "(from the entropy of each row, in bits).")
    summary = pd.DataFrame(att.head_summary(maps, causal=True))
    focus = summary.pivot(index="layer", columns="head", values="focus").to_numpy()
    st.plotly_chart(heatmap(focus, [f"layer {i}" for i in range(n_layers)], [f"head {j}" for j in range(n_heads)],
                            zmin=0, zmax=1, colorscale="Blues"), key="model_focus", width="stretch")
    st.dataframe(summary.rename(columns={"entropy_bits": "entropy (bits)", "self": "on itself",
                                         "previous": "on previous", "first": "on first",
                                         "looks_at": "mostly looks at"}).round(3),
                 hide_index=True, width="stretch")


# ------------------------------------------------------------------------------ the page

page_header(2, "Attention is how a token gathers information from the other tokens. It is the one "
               "part of a GPT where tokens talk to each other; everything else works on each token alone.")
worked_example()
st.divider()
trained_model()
