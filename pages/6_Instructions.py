"""Stage 6 — instruction fine-tuning: the same model, before and after, side by side.

Pick a language model, tune it on ~900 instructions in a background job (every weight, or LoRA
adapters), watch the loss and one validation answer change, then read the test instructions
answered by both models. The lesson is core/gpt/instruct.py; this page calls core/stages/instruct.py.
"""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.stages import instruct as stage
from core.stages.instruct import CODE, GlassBoxError
from pages._ui import escape, page_header, remembered_run, run_name_input, run_picker, show_error, start_stage_job
from pages._ui.charts import curves_figure, expected_vs_yours
from pages._ui.code import code_behind
from pages._ui.history import history_panel
from pages._ui.live import live_panel
from pages._ui.microscope import microscope_panel

PAGE_KEY = "instruct_run"

page_header(6, "A pre-trained model continues text. Shown a few hundred examples of one format — "
               "instruction, optional input, response, end-of-text — it learns to answer and to stop.")
st.info("**Honest expectations.** A tiny model pre-trained from scratch for a few minutes learns the *format* "
        "quickly — it answers briefly and stops — but its answers are rough, often grammatical nonsense. Start "
        "from imported weights (stage 3: GPT-2, SmolLM2) and the answers also make sense.", icon="💡")

# ---------------------------------------------------------------------------- 1. the data
st.header("1 · The data and the template")
try:
    overview = st.cache_data(show_spinner=False)(stage.data_overview)("instruction-data")
except GlassBoxError as e:
    show_error(e)
    overview = None
if overview:
    for col, name in zip(st.columns(3), ("train", "val", "test")):
        col.metric(f"{name} records", overview["sizes"][name])
    st.caption("Split as in the book: the first 85% train, the next 10% test, the last 5% validation — so the "
               "110 test instructions are the book's.")
    left, right = st.columns(2)
    left.markdown("**What the model reads** (prompt, then the answer, then end-of-text)")
    left.code(overview["example"], language=None, wrap_lines=True)
    right.markdown("**How a batch is made**")
    right.markdown(
        "- every example is padded with the end-of-text token to the longest in the batch;\n"
        "- targets are the inputs shifted by one token (predict the next one);\n"
        "- the **first** end-of-text stays a target — that is how the model learns to stop — the padding "
        "after it gets the ignore index `-100` and adds nothing to the loss;\n"
        "- **mask the prompt** (a switch below) also ignores the prompt tokens, so only the answer is graded.")
code_behind(*CODE["template"])

# ---------------------------------------------------------------------------- 2. tuning
st.header("2 · Tune a pre-trained model")
start_run = run_picker(stage.START_STAGES, "Start from", key="instruct_start", require_weights=True)
if start_run is None:
    st.info("No pre-trained model yet. Pre-train one on **stage 4** (the `base` preset with a BPE tokeniser is "
            "a good start) or import weights on **stage 3**.")
else:
    st.markdown(stage.COSTS_CAPTION)
    timed = st.toggle("Measure step times", key="instruct_time")
    st.dataframe(st.cache_data(show_spinner="Measuring…", max_entries=8)(stage.choice_costs)(
        start_run, int(st.session_state.get("instruct_rank", 8)), time_steps=2 * timed), hide_index=True, key="instruct_costs")
    with st.form("instruct_settings"):
        c1, c2, c3 = st.columns(3)
        minutes = c1.slider("Minutes of tuning", 0.5, 30.0, 10.0, step=0.5,
                            help="The run keeps the weights of its best validation loss: more never makes it worse.")
        lr = c2.select_slider("Learning rate", [3e-5, 5e-5, 1e-4, 3e-4, 1e-3, 3e-3],
                              value=stage.suggested_lr(start_run), format_func=lambda v: f"{v:g}",
                              help="1e-3 suits small models trained here (and LoRA); GPT-2-sized weights want "
                                   "about 5e-5, or they forget what they know.")
        batch = c3.select_slider("Batch size", [2, 4, 8, 16, 32], value=8)
        c4, c5, c6 = st.columns(3)
        mask_prompt = c4.toggle("Mask the prompt in the loss", value=False,
                                help="Grade only the answer tokens. Compare a run with and without.")
        eval_limit = c5.number_input("Test instructions to compare", 5, 110, 110, step=5,
                                     help="Both models answer these after tuning (greedy).")
        run_id = run_name_input(c6, "instruct", key="instruct_run_name")
        l1, l2, l3 = st.columns(3)
        learns = l1.radio("What learns", ["all", "lora"], horizontal=True,
                          help="all: every weight. lora: frozen weights plus low-rank adapters B A.")
        l2.number_input("LoRA rank", 1, 256, 8, key="instruct_rank")
        alpha = l3.number_input("LoRA alpha", 0.5, 512.0, 8.0)
        go_ = st.form_submit_button("Start tuning", type="primary")
    if go_:
        start_stage_job(stage, lambda: stage.page_settings(
            start_run, minutes, lr, batch, mask_prompt, eval_limit, run_id, learns,
            st.session_state.instruct_rank, alpha), run_id, PAGE_KEY, "instruct_run_name")

# ---------------------------------------------------------------------------- 3. watching
default = remembered_run(PAGE_KEY, ("instruct",), "instruct")
instruct_runs = ([default] if default else []) + [r for r in stage.instruct_runs() if r != default]
if not instruct_runs:
    st.stop()
st.header("3 · Watch it learn the format")
shown = st.selectbox("Instruction run", instruct_runs, key="instruct_shown")
st.session_state[PAGE_KEY] = shown


def draw(run_id: str) -> None:
    metrics, samples, kept = stage.curves(run_id)
    expected = stage.expected(run_id, metrics)
    left, right = st.columns([3, 2])
    with left:
        if metrics:
            left.plotly_chart(curves_figure([("train", metrics, "train_loss"), ("validation", metrics, "val_loss")],
                                            height=280, marker_step=kept, band=expected["band"]),
                              key="instruct_loss_chart")
            expected_vs_yours(expected)
        else:
            st.caption("The loss curve appears with the first steps (the starting model first answers the test "
                       "instructions, which takes a moment).")
    with right:
        if overview:
            st.markdown(f"**Validation instruction:** {escape(overview['val_instruction'])}")
        if samples:
            st.dataframe(pd.DataFrame([{"step": s["step"], "answer": s["text"]} for s in reversed(samples[-30:])]),
                         hide_index=True, height=230, key="instruct_samples")


live_panel(shown, draw, key="instruct")
st.caption("The dotted line marks the step whose weights the run keeps: its best validation loss. The loss is "
           "computed on batches made by the function below (padding and, if chosen, the prompt masked).")
code_behind(*CODE["batches"])
history_panel(shown, key="instruct_history")  # the time slider: the model at each snapshot step

# ---------------------------------------------------------------------------- 4. results
try:
    done = stage.results(shown)
except GlassBoxError as e:
    show_error(e)
    st.stop()
if done is None:
    st.caption("The side-by-side comparison appears when the run finishes (a stopped run: resume it to finish).")
    st.stop()
rates, responses = done["rates"], done["responses"]
st.header("4 · Before and after")
left, right = st.columns([1, 2])
left.plotly_chart(go.Figure(go.Bar(x=["pre-trained", "instruction-tuned"], y=[rates["start"], rates["tuned"]],
                                   marker_color=["#9a9a9a", "#1a7f37"], text=[f"{rates['start']:.0%}", f"{rates['tuned']:.0%}"]))
                  .update_layout(height=260, margin=dict(l=10, r=10, t=10, b=10), yaxis_tickformat=".0%",
                                 yaxis_range=[0, 1], yaxis_title="format-following rate"), key="instruct_rates_chart")
with right:
    st.markdown(f"**Format-following rate** on {rates['n']} test instructions (greedy, at most "
                f"{rates['max_new_tokens']} tokens): an answer counts when it is **non-empty**, ends with "
                "**end-of-text** before the budget runs out, and does **not echo the template** "
                "(`### Instruction`, `Below is an instruction` …).")
    st.metric("Pre-trained → instruction-tuned", f"{rates['tuned']:.0%}",
              delta=f"{(rates['tuned'] - rates['start']) * 100:+.0f} points from {rates['start']:.0%}")
    code_behind(*CODE["answers"])

st.subheader("Test instructions, side by side")
per_page = 8
pages = max(1, (len(responses) + per_page - 1) // per_page)
page = st.number_input("Page", 1, pages, 1, key="instruct_page") if pages > 1 else 1
first = (page - 1) * per_page
st.markdown(stage.side_by_side_html(list(enumerate(responses[first:first + per_page], start=first + 1))),
            unsafe_allow_html=True)

# ---------------------------------------------------------------------------- 5. your instruction


@st.cache_resource(show_spinner="Loading both models…", max_entries=2)
def comparison_models(run_id: str, version: float):
    return stage.load_comparison_models(run_id)


st.header("5 · Your own instruction")
with st.form("own_instruction"):
    instruction = st.text_area("Instruction", placeholder="Name three primary colours.", key="instruct_own")
    extra_input = st.text_input("Input (optional)", placeholder="")
    g1, g2, g3 = st.columns(3)
    temperature = g1.slider("Temperature", 0.0, 1.5, 0.0, step=0.1, help="0 = greedy (always the likeliest token)")
    top_k = g2.number_input("Top-k (0 = off)", 0, 500, 0)
    max_tokens = g3.slider("Max tokens", 8, 256, 96, step=8, key="instruct_own_tokens")
    ask = st.form_submit_button("Ask both models", type="primary", key="instruct_ask")
if ask:
    if not instruction.strip():
        st.error("Type an instruction first: the models need something to answer.", icon="✍️")
    else:
        try:
            base_model, tuned_model, tokenizer = comparison_models(shown, stage.weights_version(shown))
            answers = stage.answer_both(base_model, tuned_model, tokenizer, {"instruction": instruction,
                                        "input": extra_input}, max_new_tokens=int(max_tokens),
                                        temperature=float(temperature), top_k=int(top_k) or None)
        except (GlassBoxError, OSError) as e:
            show_error(e)
        else:
            st.markdown(stage.side_by_side_html([("you", stage.own_row(instruction, extra_input, answers))]),
                        unsafe_allow_html=True)

# ---------------------------------------------------------------------------- 6. inside the tuned model
st.header("6 · Inside the tuned model")
microscope_panel(shown, key="instruct_microscope", default_prompt="Name three primary colours.")
