"""Stage 2 — Attention: how each token decides which other tokens to listen to.

Part 1 works through attention by hand on a six-word sentence: every matrix as a table and a
heatmap. Part 2 opens a trained model and shows where each of its heads looks. Part 3 shows how
RoPE tells attention where each token sits. The maths is core/gpt/attention.py and core/gpt/rope.py;
this page calls core/stages/attention.py and draws.
"""

import numpy as np
import pandas as pd
import streamlit as st

from core.stages import attention as stage
from core.stages.attention import GlassBoxError
from pages._ui import page_header, run_picker, show_error
from pages._ui.code import code_behind
from pages._ui.model_figures import grid_figure, heatmap, readable, rope_arrows, unique_labels

GRID_LIMIT = 32  # most small heatmaps drawn at once; pick layers for bigger models


def table(matrix, rows: list[str], cols: list[str], digits: int = 2) -> None:
    frame = pd.DataFrame(np.asarray(matrix.tolist(), dtype=float), index=rows, columns=cols)
    st.dataframe(frame.style.format(f"{{:.{digits}f}}"), width="stretch")


def step(title: str, explanation: str, matrix, rows, cols, key: str, **heat) -> None:
    """One step of the worked example: a sentence of why, then the numbers and their picture."""
    if title:
        st.markdown(f"#### {title}")
    st.markdown(explanation)
    left, right = st.columns([1, 1])
    with left:
        table(matrix, rows, cols, heat.get("digits", 2))
    with right:
        st.plotly_chart(heatmap(matrix, rows, cols, **heat), key=key, width="stretch")


def controls() -> stage.Settings:
    text = st.text_input("A short sentence (split on spaces)", stage.EXAMPLE_SENTENCE, key="toy_text")
    c1, c2, c3 = st.columns(3)
    seed = c1.slider("Seed (random embeddings and weights)", 0, 50, 0, key="toy_seed")
    d_head = c2.slider("Head dimension d", 1, 8, 4, key="toy_dhead")
    n_heads = c3.slider("Number of heads", 1, 4, 1, key="toy_heads")
    c4, c5, c6 = st.columns(3)
    causal = c4.toggle("Causal mask (hide future words)", value=False, key="toy_causal")
    dropout = c5.slider("Attention dropout", 0.0, 0.8, 0.0, 0.1, key="toy_dropout")
    d_model = c6.slider("Embedding size", 2, 8, 4, key="toy_dmodel")
    return stage.Settings(text=text, heads=n_heads, causal=causal, seed=seed, dim=d_head,
                          embed_dim=d_model, dropout=dropout)


def worked_example() -> None:
    st.header("1 · Attention by hand")
    st.markdown("Each word asks a **query** (what am I looking for?), offers a **key** (what do I contain?) "
                "and carries a **value** (what I pass on). A word's new vector is an average of all values, "
                "weighted by how well its query matches each key. Move the controls: every number below "
                "is recomputed, and each one can be checked by hand.")
    settings = controls()
    try:
        s = stage.worked_example(settings)
    except GlassBoxError as e:
        show_error(e)
        return
    words, dims = unique_labels(s["tokens"]), [f"d{i}" for i in range(settings.dim)]
    h = 0
    if settings.heads > 1:
        h = st.radio("Show head", list(range(settings.heads)), horizontal=True, key="toy_head",
                     format_func=lambda i: f"head {i}")
        st.caption("Every head has its own W_q, W_k, W_v, so it scores the words differently.")
    step("0 · Embeddings X", "Each word is a vector from a (seeded, random) embedding table, rounded "
         "to one decimal. A repeated word gets the same vector.", s["X"], words,
         [f"e{i}" for i in range(settings.embed_dim)], "toy_x")
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
    step(f"3 · Scaled scores = scores × 1/√{settings.dim} = scores × {s['scale']:.3f}",
         "Dot products grow with the dimension; scaling keeps them near 1 so that softmax does not "
         "pick a single winner too early.", s["scaled"][h], words, words, "toy_scaled")
    st.markdown("#### 4 · Causal mask")
    if settings.causal:
        step("", "A GPT predicts the next word, so a word may not look ahead: scores of later words "
             "become −∞ (the shaded triangle).", s["masked"][h], words, words, "toy_masked")
    else:
        st.info("Off: every word may look at every word. Switch on *Causal mask* to see what a GPT does.")
    step("5 · Weights = softmax(scaled scores)", "Each row becomes positive numbers that add up to 1: "
         "the share of attention word *i* gives to each word.", s["weights"][h], words, words,
         "toy_weights", zmin=0, zmax=1, colorscale="Blues", digits=3)
    code_behind(*stage.CODE["attention"], *stage.CODE["causal_mask"])
    st.markdown("#### 6 · Dropout")
    if settings.dropout > 0:
        step("", f"During training some weights are zeroed at random and the rest multiplied by "
             f"1/(1−p) = {1 / (1 - settings.dropout):.2f}, so the model cannot rely on one connection "
             f"(p = {settings.dropout:.1f}).", s["dropped"][h], words, words, "toy_dropped", zmin=0,
             colorscale="Blues", digits=3)
    else:
        st.info("Dropout is 0: the weights are used as they are (as at inference time).")
    step("7 · Context = weights · V", "Each word's new vector: its weighted average of the value vectors.",
         s["context"][h], words, dims, "toy_context")
    if settings.heads > 1:
        st.markdown(f"The {settings.heads} heads' contexts are put side by side: each word leaves attention with "
                    f"{settings.heads} × {settings.dim} = {settings.heads * settings.dim} numbers "
                    "(a final linear layer then mixes them).")


def check_by_hand(s: dict, h: int, words: list[str]) -> None:
    """Spell out one score as the sum of products, so the learner sees there is no magic."""
    with st.expander("Check one score by hand"):
        a, b = st.columns(2)
        i = a.selectbox("Query word", range(len(words)), format_func=lambda n: words[n], key="toy_qi")
        j = b.selectbox("Key word", range(len(words)), index=min(1, len(words) - 1),
                        format_func=lambda n: words[n], key="toy_kj")
        st.code(stage.score_by_hand(s, h, i, j, words), language=None)


def trained_model() -> None:
    st.header("2 · Where a trained model looks")
    st.markdown("A trained GPT has several layers of several heads. Each head learnt its own habit: "
                "some look at the previous token, some at the first token, some spread out.")
    run_id = run_picker(stage.LANGUAGE_MODEL_STAGES, "Model run", key="model_run", require_weights=True)
    if run_id is None:
        st.info("No trained model yet: train a model on stage 4 first (or import GPT-2 weights), "
                "then come back to see its attention.")
        return
    text = st.text_area("Text to read", "To be, or not to be, that is the question.", key="model_text")
    max_tokens = st.slider("Tokens shown (at most)", 4, 64, 24, key="model_tokens")
    try:
        found = stage.results(run_id, text, max_tokens=max_tokens)
    except GlassBoxError as e:
        show_error(e)
        return
    labels = [readable(t) for t in found["tokens"]]  # plots place labels by position: repeats are fine
    maps, n_layers, n_heads = found["maps"].numpy(), found["layers"], found["heads"]
    st.caption(f"{len(labels)} tokens · {n_layers} layers × {n_heads} heads. Row = the token reading, "
               "column = the token it looks at; dark = much attention.")
    layers = list(range(n_layers))
    if n_layers * n_heads > GRID_LIMIT:
        most = max(1, GRID_LIMIT // n_heads)
        layers = st.multiselect("Layers to show", layers, default=layers[:most], key="model_layers",
                                max_selections=most) or layers[:1]
    st.plotly_chart(grid_figure(maps, sorted(layers), labels), key="model_grid", width="stretch")
    code_behind(*stage.CODE["model_maps"])
    st.subheader("One head, enlarged")
    a, b = st.columns(2)
    layer = a.selectbox("Layer", range(n_layers), key="model_layer")
    head = b.selectbox("Head", range(n_heads), key="model_head")
    st.plotly_chart(heatmap(maps[layer, head], labels, labels, zmin=0, zmax=1, colorscale="Blues",
                            numbers=len(labels) <= 14, height=160 + 34 * len(labels)), key="model_big", width="stretch")
    st.subheader("Where does each head look?")
    st.markdown("**Focus** is 1 when a head always looks at one token and 0 when it spreads evenly "
                "(from the entropy of each row, in bits).")
    summary = pd.DataFrame(found["summary"])
    focus = summary.pivot(index="layer", columns="head", values="focus").to_numpy()
    st.plotly_chart(heatmap(focus, [f"layer {i}" for i in range(n_layers)], [f"head {j}" for j in range(n_heads)],
                            zmin=0, zmax=1, colorscale="Blues"), key="model_focus", width="stretch")
    code_behind(*stage.CODE["head_summary"])
    st.dataframe(summary.rename(columns={"entropy_bits": "entropy (bits)", "self": "on itself",
                                         "previous": "on previous", "first": "on first",
                                         "looks_at": "mostly looks at"}).round(3), hide_index=True, width="stretch")


def rope_section() -> None:
    st.header("3 · Where is a token? Rotary positions (RoPE)")
    st.markdown("Attention by itself cannot tell *where* a word is: shuffle the words and every score stays. "
                "GPT-2 adds a learned position vector. Llama-style models **rotate** each query and key "
                "instead, by an angle proportional to the position. Rotating both by the same extra angle "
                "leaves their dot product unchanged, so the score depends only on the **distance**.")
    if not st.toggle("Show RoPE rotating a query and a key", key="rope_show"):
        return
    a, b, c = st.columns(3)
    m = a.slider("Query position m", 0, 11, 5, key="rope_m")
    n = b.slider("Key position n", 0, 11, 2, key="rope_n")
    seed = c.number_input("Seed (random q and k)", 0, 1000, 0, key="rope_seed")
    r = stage.rope_example(seed=int(seed), query_position=m, key_position=n)
    left, right = st.columns(2)
    left.plotly_chart(rope_arrows(r["pairs"], m, n), key="rope_arrows", width="stretch")
    right.plotly_chart(heatmap(r["scores"], [f"q@{i}" for i in range(12)], [f"k@{j}" for j in range(12)],
                               digits=1, numbers=False), key="rope_scores", width="stretch")
    same = ", ".join(f"({i},{j}) {s:.3f}" for i, j, s in r["same_distance"][:6])
    st.markdown(f"Score of q at {m} and k at {n}: **{r['score']:.3f}**. The same q and k at other positions "
                f"with the same distance {m - n}: {same} — one value along each diagonal of the table. "
                f"Without rotation the score would be {r['plain_score']:.3f} at every position.")
    code_behind(*stage.CODE["rope"], *stage.CODE["rope_scores"])


page_header(2, "Attention is how a token gathers information from the other tokens. It is the one "
               "part of a GPT where tokens talk to each other; everything else works on each token alone.")
worked_example()
st.divider()
trained_model()
st.divider()
rope_section()
