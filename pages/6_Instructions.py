"""Stage 6 — instruction fine-tuning: the same model, before and after, side by side.

The learner picks a pre-trained run, tunes it on ~900 instructions in a background job, watches
the loss and the answer to one validation instruction change, and then reads the test
instructions answered by the pre-trained and the tuned model next to the reference answer.
"""

import altair as alt
import pandas as pd
import streamlit as st

from core.lab import runs
from core.gpt.errors import GlassBoxError
from core.gpt import instruct as ins
from pages._ui import (escape, job_controls, page_header, remembered_run, run_ids_with_pending, run_picker,
                       run_name_input, show_error, start_job)

PAGE_KEY = "instruct_run"
START_STAGES = ("pretrain", "import")

page_header(6, "A pre-trained model continues text. Shown a few hundred examples of one format — "
               "instruction, optional input, response, end-of-text — it learns to answer and to stop.")

st.info(
    "**Honest expectations.** A tiny model pre-trained from scratch for a few minutes learns the "
    "*format* quickly — it answers briefly and stops — but its answers are rough, often "
    "grammatical nonsense. Start from imported GPT-2 weights (stage 3) and the answers also make "
    "sense.", icon="💡")


# ---------------------------------------------------------------------------- 1. the data
@st.cache_data(show_spinner=False)
def instruction_splits(source: str) -> dict:
    return ins.split_records(ins.load_instruction_data(source))


st.header("1 · The data and the template")
try:
    splits = instruction_splits("instruction-data")
except GlassBoxError as e:
    show_error(e)
    splits = None
if splits:
    cols = st.columns(3)
    for col, name in zip(cols, ("train", "val", "test")):
        col.metric(f"{name} records", len(splits[name]))
    st.caption("Split as in the book: the first 85% train, the next 10% test, the last 5% "
               "validation — so the 110 test instructions are the book's.")
    example = splits["train"][1]
    left, right = st.columns(2)
    left.markdown("**What the model reads** (prompt, then the answer, then end-of-text)")
    left.code(ins.format_example(example) + ins.END_OF_TEXT, language=None, wrap_lines=True)
    right.markdown("**How a batch is made**")
    right.markdown(
        "- every example is padded with the end-of-text token to the longest in the batch;\n"
        "- targets are the inputs shifted by one token (predict the next one);\n"
        "- the **first** end-of-text stays a target — that is how the model learns to stop — "
        "the padding after it gets the ignore index `-100` and adds nothing to the loss;\n"
        "- **mask the prompt** (a switch below) also ignores the prompt tokens, so only the "
        "answer is graded.")

# ---------------------------------------------------------------------------- 2. tuning
st.header("2 · Tune a pre-trained model")
start_run = run_picker(START_STAGES, "Start from", key="instruct_start", require_weights=True)
if start_run is None:
    st.info("No pre-trained model yet. Pre-train one on **stage 4** (the `base` preset with a BPE "
            "tokeniser is a good start) or import GPT-2 weights on **stage 3**.")
else:
    with st.form("instruct_settings"):
        c1, c2, c3 = st.columns(3)
        minutes = c1.slider("Minutes of tuning", 0.5, 30.0, 10.0, step=0.5)
        lr = c2.select_slider("Learning rate", [3e-5, 5e-5, 1e-4, 3e-4, 1e-3, 3e-3],
                              value=ins.suggested_lr(start_run), format_func=lambda v: f"{v:g}",
                              help="1e-3 suits small models trained here; GPT-2 weights want "
                                   "about 5e-5, or they forget what they know.")
        batch = c3.select_slider("Batch size", [2, 4, 8, 16, 32], value=8)
        c4, c5, c6 = st.columns(3)
        mask_prompt = c4.toggle("Mask the prompt in the loss", value=False,
                                help="Grade only the answer tokens. Compare a run with and without.")
        eval_limit = c5.number_input("Test instructions to compare", 5, 110, 110, step=5,
                                     help="Both models answer these after tuning (greedy).")
        run_id = run_name_input(c6, "instruct", key="instruct_run_name")
        go = st.form_submit_button("Start tuning", type="primary")
    if go:
        try:
            runs.validate_run_id(run_id)
            argv = ["instruct", "--from", start_run, "--data", "instruction-data",
                    "--minutes", str(minutes), "--lr", str(lr), "--batch-size", str(batch),
                    "--eval-limit", str(int(eval_limit)), "--run-id", run_id]
            if mask_prompt:
                argv.append("--mask-prompt")
        except GlassBoxError as e:
            show_error(e)
        else:
            if start_job(argv, run_id):
                st.session_state[PAGE_KEY] = run_id
                del st.session_state["instruct_run_name"]  # a fresh name for the next run
                st.rerun()

# ---------------------------------------------------------------------------- 3. watching
instruct_runs = run_ids_with_pending(("instruct",), "instruct")  # a just-started job included
if not instruct_runs:
    st.stop()

st.header("3 · Watch it learn the format")
default = remembered_run(PAGE_KEY, ("instruct",), "instruct")
shown = st.selectbox("Instruction run", instruct_runs,
                     index=instruct_runs.index(default) if default in instruct_runs else 0,
                     key="instruct_shown")
st.session_state[PAGE_KEY] = shown


def loss_chart(metrics: list[dict]):
    rows = [{"step": m["step"], "loss": m[key], "curve": name}
            for m in metrics for key, name in (("train_loss", "train"), ("val_loss", "validation"))
            if m.get(key) is not None]
    if len(rows) > 600:  # long histories: keep the chart light
        stride = len(rows) // 600 + 1
        rows = rows[::stride] + rows[-2:]
    data = pd.DataFrame(rows)
    return alt.Chart(data).mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        x=alt.X("step:Q", title="step"), y=alt.Y("loss:Q", title="loss", scale=alt.Scale(zero=False)),
        color=alt.Color("curve:N", title=None,
                        scale=alt.Scale(domain=["train", "validation"], range=["#1f77b4", "#ff7f0e"]))
    ).properties(height=260)


@st.fragment(run_every=1)
def live_view(run_id: str) -> None:
    state = job_controls(run_id, key="instruct_job")
    run_path = runs.run_dir(run_id)
    metrics = runs.read_jsonl(run_path / "metrics.jsonl")
    samples = runs.read_jsonl(run_path / "samples.jsonl")
    left, right = st.columns([3, 2])
    with left:
        if metrics:
            st.altair_chart(loss_chart(metrics), key="instruct_loss_chart")
        else:
            st.caption("The loss curve appears with the first steps (the starting model first "
                       "answers the test instructions, which takes a moment).")
    with right:
        entry = splits["val"][0] if splits else None
        if entry:
            st.markdown(f"**Validation instruction:** {escape(entry['instruction'])}")
        if samples:
            st.dataframe(pd.DataFrame([{"step": s["step"], "answer": s["text"]}
                                       for s in reversed(samples[-30:])]),
                         hide_index=True, height=230, key="instruct_samples")
    # When the job has just ended, rerun the whole page once so the results below appear.
    active_key = f"instruct_active_{run_id}"
    if state and state.active:
        st.session_state[active_key] = True
    elif st.session_state.pop(active_key, False):
        st.rerun(scope="app")


live_view(shown)

# ---------------------------------------------------------------------------- 4. results
try:
    rates = ins.read_format_rates(shown)
except GlassBoxError as e:
    show_error(e)
    st.stop()
if rates is None:
    st.caption("The side-by-side comparison appears when the run finishes (a stopped run: "
               "resume it to finish).")
    st.stop()
try:
    responses = ins.read_responses(shown)
except GlassBoxError as e:
    show_error(e)
    st.stop()

st.header("4 · Before and after")
left, right = st.columns([1, 2])
with left:
    rate_data = pd.DataFrame([{"model": "pre-trained", "rate": rates["start"]},
                              {"model": "instruction-tuned", "rate": rates["tuned"]}])
    bars = alt.Chart(rate_data).mark_bar().encode(
        x=alt.X("model:N", sort=None, title=None, axis=alt.Axis(labelAngle=0)),
        y=alt.Y("rate:Q", title="format-following rate", scale=alt.Scale(domain=[0, 1]),
                axis=alt.Axis(format="%")),
        color=alt.Color("model:N", legend=None,
                        scale=alt.Scale(domain=["pre-trained", "instruction-tuned"],
                                        range=["#9a9a9a", "#1a7f37"])))
    labels = bars.mark_text(dy=-8).encode(text=alt.Text("rate:Q", format=".0%"))
    st.altair_chart((bars + labels).properties(height=240), key="instruct_rates_chart")
with right:
    st.markdown(
        f"**Format-following rate** on {rates['n']} test instructions (greedy, at most "
        f"{rates['max_new_tokens']} tokens): an answer counts when it is **non-empty**, ends with "
        "**end-of-text** before the budget runs out, and does **not echo the template** "
        "(`### Instruction`, `Below is an instruction` …).")
    st.metric("Pre-trained → instruction-tuned", f"{rates['tuned']:.0%}",
              delta=f"{(rates['tuned'] - rates['start']) * 100:+.0f} points from {rates['start']:.0%}")


def answer_cell(row: dict, model: str) -> str:
    """One model's answer ("base" or "tuned") with a ✓ / ✗ badge for the format rules."""
    text, ok = row[f"{model}_response"], row[f"{model}_follows_format"]
    problems, new_tokens = row[f"{model}_problems"], row.get(f"{model}_new_tokens")
    badge = ("<span style='color:#1a7f37;font-weight:600'>✓ answers</span>" if ok else
             f"<span style='color:#cf222e;font-weight:600'>✗ {escape('; '.join(problems) or 'off format')}</span>")
    if not text:
        # a model that only continues text often writes nothing but line breaks and spaces
        tokens = f" for {new_tokens} tokens" if new_tokens else ""
        return f"{badge}<br><i>(nothing but spaces and line breaks{tokens})</i>"
    shown_text = text if len(text) <= 400 else text[:400] + " …"
    return f"{badge}<br>{escape(shown_text)}"


TD = "<td style='vertical-align:top'>"


def side_by_side_html(rows: list[tuple]) -> str:
    """(number, record) rows as an HTML table; every piece of text is escaped."""
    head = ("<tr><th>#</th><th>instruction</th><th>reference</th><th>pre-trained</th>"
            "<th>instruction-tuned</th></tr>")
    body = []
    for number, r in rows:
        instruction = escape(r["instruction"])
        if r.get("input"):
            instruction += f"<br><i>{escape(r['input'])}</i>"
        body.append(
            f"<tr>{TD}{escape(number)}</td>{TD}{instruction}</td>{TD}{escape(r['output'])}</td>"
            f"{TD}{answer_cell(r, 'base')}</td>{TD}{answer_cell(r, 'tuned')}</td></tr>")
    return ("<table style='width:100%;font-size:0.9em'>"
            f"{head}{''.join(body)}</table>")


st.subheader("Test instructions, side by side")
per_page = 8
pages = max(1, (len(responses) + per_page - 1) // per_page)
page = st.number_input("Page", 1, pages, 1, key="instruct_page") if pages > 1 else 1
first = (page - 1) * per_page
rows = list(enumerate(responses[first:first + per_page], start=first + 1))
st.markdown(side_by_side_html(rows), unsafe_allow_html=True)

# ---------------------------------------------------------------------------- 5. your instruction


@st.cache_resource(show_spinner="Loading both models…", max_entries=2)
def comparison_models(run_id: str, weights_mtime: float):
    return ins.load_comparison_models(run_id)


st.header("5 · Your own instruction")
with st.form("own_instruction"):
    instruction = st.text_area("Instruction", placeholder="Name three primary colours.")
    extra_input = st.text_input("Input (optional)", placeholder="")
    g1, g2, g3 = st.columns(3)
    temperature = g1.slider("Temperature", 0.0, 1.5, 0.0, step=0.1, help="0 = greedy (always the likeliest token)")
    top_k = g2.number_input("Top-k (0 = off)", 0, 500, 0)
    max_tokens = g3.slider("Max tokens", 8, 256, 96, step=8)
    ask = st.form_submit_button("Ask both models", type="primary")
if ask:
    if not instruction.strip():
        st.error("Type an instruction first: the models need something to answer.", icon="✍️")
    else:
        try:
            weights = runs.run_dir(shown) / "model.safetensors"
            base_model, tuned_model, tokenizer = comparison_models(shown, weights.stat().st_mtime)
            answers = ins.answer_both(base_model, tuned_model, tokenizer,
                                      {"instruction": instruction, "input": extra_input},
                                      max_new_tokens=int(max_tokens), temperature=float(temperature),
                                      top_k=int(top_k) or None)
        except (GlassBoxError, OSError) as e:
            show_error(e)
        else:
            row = {"instruction": instruction, "input": extra_input, "output": "—",
                   "base_response": answers["base"].text, "tuned_response": answers["tuned"].text,
                   "base_follows_format": answers["base"].follows_format,
                   "tuned_follows_format": answers["tuned"].follows_format,
                   "base_problems": answers["base"].problems,
                   "tuned_problems": answers["tuned"].problems,
                   "base_new_tokens": answers["base"].new_tokens,
                   "tuned_new_tokens": answers["tuned"].new_tokens}
            st.markdown(side_by_side_html([("you", row)]), unsafe_allow_html=True)
