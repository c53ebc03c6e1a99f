"""Stage 5 — fine-tuning for classification: the pre-trained model learns to tell spam from ham.

The learner sees the balanced SMS data, starts a fine-tuning job from a stage-4 run (or from random
weights of the same shape, the control experiment), watches loss and accuracy live, reads the test
accuracy, the confusion matrix and the messages the model got wrong, types a message of their own,
and puts two runs side by side to see what pre-training buys.
"""

import altair as alt
import pandas as pd
import streamlit as st

from core.lab import jobs, runs
from core.gpt.errors import GlassBoxError
from core.gpt import classify as C
from pages._ui import (escape, job_controls, page_header, remembered_run, run_name_input, show_error,
                       start_job)

PAGE_KEY = "classify_run"

page_header(5, "A pre-trained model already turns text into useful features. Swap its output layer "
               "(one score per vocabulary entry) for a tiny one with two scores — ham, spam — and "
               "teach it with a few hundred labelled messages.")


# ---------------------------------------------------------------------------- 1. the data
@st.cache_data(show_spinner=False)
def data_overview(source: str) -> dict:
    examples = C.load_sms_examples(source)
    parts = C.split_examples(C.balance_classes(examples))
    samples = [{"label": C.LABELS[e.label], "message": e.text}
               for label in (0, 1) for e in [x for x in parts["train"] if x.label == label][:3]]
    return {"raw": C.class_counts(examples), "split": {k: len(v) for k, v in parts.items()},
            "samples": samples}


st.header("1 · The data: 747 spam messages, and as many ham")
try:
    overview = data_overview("sms-spam")
except GlassBoxError as e:
    show_error(e)
    overview = None
if overview:
    raw, split = overview["raw"], overview["split"]
    c = st.columns(5)
    c[0].metric("ham (raw)", f"{raw['ham']:,}")
    c[1].metric("spam (raw)", f"{raw['spam']:,}")
    c[2].metric("train", split["train"])
    c[3].metric("validation", split["val"])
    c[4].metric("test", split["test"])
    st.caption(
        f"The UCI SMS Spam Collection has {raw['ham']:,} ham and {raw['spam']:,} spam messages: "
        "a model that always says *ham* would score 87 %. So, as the book does, ham is "
        "**under-sampled** to the number of spam messages (fixed seed), then the 1,494 messages "
        "are shuffled and split 70 / 10 / 20. Each message is tokenised with the start run's "
        "tokeniser and padded (or cut) to one length; the model reads the whole message and "
        "answers at its **last real token** — the only position that has seen every word.")
    st.dataframe(pd.DataFrame(overview["samples"]), hide_index=True, key="classify_samples")

# ---------------------------------------------------------------------------- 2. start a run
st.header("2 · Fine-tune a model")
start_runs = [r for r in runs.list_runs(C.START_STAGES) if not r.error and r.has_weights()]
if not start_runs:
    st.info(
        "**No pre-trained model yet.** Fine-tuning starts from a language model: pre-train one on "
        "**stage 4** (the `base` preset for 5 minutes is enough — on the command line: "
        "`python -m core pretrain --preset base --minutes 5 --run-id base`) or import GPT-2 "
        "weights on **stage 3**. Then come back here.", icon="💡")
else:
    labels = {r.id: f"{r.id} — {r.stage}, {r.state}" for r in start_runs}
    with st.form("classify_settings"):
        c1, c2 = st.columns(2)
        start_run = c1.selectbox("Start from", list(labels), format_func=labels.get)
        init = c2.radio("Starting weights", ["pre-trained", "random"], horizontal=True,
                        help="Random: the same architecture and tokeniser with fresh random "
                             "weights — the control experiment that shows what pre-training buys.")
        freeze = st.radio("What learns", list(C.FREEZE_MODES), index=list(C.FREEZE_MODES).index(C.DEFAULT_FREEZE),
                          format_func=lambda m: f"{m}: {C.FREEZE_MODES[m]}", horizontal=False)
        c3, c4, c5 = st.columns(3)
        budget = c3.radio("Budget", ["steps", "minutes"], horizontal=True)
        amount = c3.number_input("How many", min_value=1.0, max_value=10000.0,
                                 value=float(C.DEFAULT_STEPS), step=1.0,
                                 help="Steps (one batch each) or minutes of training.")
        batch = c4.select_slider("Batch size", [4, 8, 16, 32], value=16)
        lr = c4.select_slider("Learning rate", [5e-5, 1e-4, 3e-4, 5e-4, 1e-3, 3e-3], value=1e-3,
                              help="Small models from stage 4 like 1e-3; GPT-2 prefers 5e-5.")
        max_length = c5.number_input("Pad / truncate to (tokens, 0 = automatic)", 0, 4096, 0,
                                     help="Automatic: the longest training message, at most the "
                                          "model's context length.")
        run_id = run_name_input(c5, "classify", key="classify_run_name")
        go = st.form_submit_button("Start fine-tuning", type="primary")
    if go:
        try:
            runs.validate_run_id(run_id)
        except GlassBoxError as e:
            show_error(e)
        else:
            argv = ["classify", "--from", start_run, "--data", "sms-spam", "--freeze", freeze,
                    "--batch-size", str(batch), "--lr", str(lr), "--run-id", run_id]
            argv += ["--steps", str(int(amount))] if budget == "steps" else ["--minutes", str(amount)]
            if init == "random":
                argv.append("--random-init")
            if max_length:
                argv += ["--max-length", str(int(max_length))]
            if start_job(argv, run_id):
                st.session_state[PAGE_KEY] = run_id
                del st.session_state["classify_run_name"]  # a fresh name for the next run
                st.rerun()

# ---------------------------------------------------------------------------- 3. watch it learn
classifier_runs = [r for r in runs.list_runs("classify") if not r.error]
run_ids = [r.id for r in classifier_runs]
default = remembered_run(PAGE_KEY, ("classify",), "classify")
if default and default not in run_ids:  # a job just started: its config.json is not written yet
    run_ids.insert(0, default)
if not run_ids:
    st.caption("No fine-tuning run yet: the curves, results and the message tester appear here "
               "once one has started.")
    st.stop()

st.header("3 · Watch it learn")
shown = st.selectbox("Classifier run", run_ids,
                     index=run_ids.index(default) if default in run_ids else 0, key="classify_shown")
st.session_state[PAGE_KEY] = shown


def describe_run(run: runs.Run) -> str:
    info = run.config.get("classifier", {})
    start = ("random weights shaped like " if info.get("random_init") else "") + str(info.get("start_run", "?"))
    return (f"from **{escape(start)}** · freeze **{escape(info.get('freeze', '?'))}** · "
            f"{info.get('trainable_parameters', 0):,} of {info.get('parameters', 0):,} parameters learn · "
            f"messages padded to {info.get('pad_length', '?')} tokens")


def downsample(rows: list[dict], limit: int = 400) -> list[dict]:
    if len(rows) <= limit:
        return rows
    stride = len(rows) // limit + 1
    return rows[::stride] + rows[-1:]


def curves_chart(metrics: list[dict], kind: str):
    """Train and validation curves of `kind` ('loss' or 'accuracy') against the step."""
    rows = [{"step": m["step"], kind: m[f"{split}_{kind}"], "curve": name}
            for m in metrics for split, name in (("train", "train"), ("val", "validation"))
            if m.get(f"{split}_{kind}") is not None]
    axis = alt.Axis(format="%") if kind == "accuracy" else alt.Axis()
    scale = alt.Scale(domain=[0.4, 1]) if kind == "accuracy" else alt.Scale(zero=False)
    return alt.Chart(pd.DataFrame(downsample(rows))).mark_line(point=alt.OverlayMarkDef(size=14)).encode(
        x=alt.X("step:Q"), y=alt.Y(f"{kind}:Q", scale=scale, axis=axis),
        color=alt.Color("curve:N", title=None)).properties(height=240)


def live_view(run_id: str, polling: bool) -> None:
    state = job_controls(run_id, key="classify_job")
    if not (runs.run_dir(run_id) / "config.json").is_file():
        if state and state.active:
            st.caption("Loading the start model and tokenising the messages…")
        return
    try:
        run = runs.open_run(run_id)
    except GlassBoxError as e:
        show_error(e)
        return
    st.markdown(describe_run(run))
    metrics = run.metrics()
    if not metrics:
        st.caption("The curves appear after the first steps.")
    else:
        left, right = st.columns(2)
        with left:
            st.altair_chart(curves_chart(metrics, "loss"), key="classify_loss_chart")
        with right:
            if any("val_accuracy" in m for m in metrics):
                st.altair_chart(curves_chart(metrics, "accuracy"), key="classify_accuracy_chart")
            else:
                st.caption("Accuracy is measured at every evaluation step.")
        st.caption("Train loss is the average over the steps since the last point; accuracies are "
                   "measured at each evaluation (validation: every message; train: the same "
                   f"{C.TRAIN_ACCURACY_SUBSET} messages each time).")
    # When the job ends, one full rerun draws the results below and stops the polling.
    if polling and not (state and state.active):
        st.rerun(scope="app")


# Poll every second while the job runs; a finished run's curves are drawn once and left alone.
try:
    polling = jobs.job_state(shown).active
except GlassBoxError:
    polling = False
st.fragment(run_every=1 if polling else None)(live_view)(shown, polling)

# ---------------------------------------------------------------------------- 4. results
try:
    results = C.read_results(shown)
except GlassBoxError as e:
    show_error(e)
    results = None

if results is None:
    st.caption("Test accuracy, the confusion matrix and the misclassified messages appear when "
               "the run finishes (a stopped run shows them too; resume it to go on).")
else:
    st.header("4 · How well does it do?")
    if results.get("stopped"):
        st.warning(f"This run was stopped at step {results.get('steps')}: these are the results "
                   "of the model as it was then. Resume it to continue.", icon="⏸️")
    c = st.columns(4)
    c[0].metric("test accuracy", f"{results['test_accuracy']:.1%}")
    c[1].metric("validation accuracy", f"{results['val_accuracy']:.1%}")
    c[2].metric("train accuracy", f"{results['train_accuracy']:.1%}")
    c[3].metric("steps", results.get("steps", "?"))
    st.caption("The book reports 95.67 % test accuracy fine-tuning GPT-2 small (124M parameters). "
               "Train accuracy far above test accuracy means the model memorises the training set.")
    left, right = st.columns([2, 3])
    with left:
        st.subheader("Confusion matrix (test)")
        matrix = results["confusion_matrix"]
        labels = results.get("labels", list(C.LABELS))
        cells = pd.DataFrame([{"true": labels[t], "predicted": labels[p], "messages": matrix[t][p]}
                              for t in range(len(labels)) for p in range(len(labels))])
        base = alt.Chart(cells).encode(x=alt.X("predicted:N", title="predicted"),
                                       y=alt.Y("true:N", title="true label"))
        heat = base.mark_rect().encode(color=alt.Color("messages:Q", scale=alt.Scale(scheme="blues"),
                                                       legend=None))
        text = base.mark_text(fontSize=18).encode(text="messages:Q")
        st.altair_chart((heat + text).properties(height=220), key="classify_confusion")
        st.caption("The diagonal is right. Ham called spam (top right) is the costly mistake: a "
                   "real message lost in the spam folder.")
    with right:
        st.subheader(f"Misclassified test messages ({results.get('misclassified_count', 0)})")
        wrong = results.get("misclassified", [])
        if wrong:
            # st.dataframe shows text as text (never as HTML), so messages need no escaping here.
            st.dataframe(pd.DataFrame([{"true": w["label"], "predicted": w["predicted"],
                                        "P(spam)": w["p_spam"], "message": w["text"]} for w in wrong]),
                         hide_index=True, height=260, key="classify_wrong",
                         column_config={"P(spam)": st.column_config.ProgressColumn(
                             "P(spam)", min_value=0.0, max_value=1.0, format="%.2f")})
        else:
            st.success("Every test message was classified correctly.")

# ---------------------------------------------------------------------------- 5. your message
st.header("5 · Try your own message")
with st.form("classify_own"):
    message = st.text_area("Message", placeholder="Congratulations! You have won a free cruise. "
                                                  "Text WIN to 80086 now.")
    ask = st.form_submit_button("Classify", type="primary")
if ask:
    try:
        answer = C.classify_message(shown, message)
    except GlassBoxError as e:
        show_error(e)
    else:
        probs = answer["probabilities"]
        st.markdown(f"The model says **{escape(answer['label'])}** "
                    f"({probs[answer['label']]:.1%}).")
        bars = pd.DataFrame([{"class": k, "probability": v} for k, v in probs.items()])
        chart = alt.Chart(bars).mark_bar().encode(
            x=alt.X("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            y=alt.Y("class:N", title=None), color=alt.Color("class:N", legend=None))
        st.altair_chart(chart.properties(height=110), key="classify_own_chart")
        if answer["truncated"]:
            st.info(f"Your message is {answer['tokens']} tokens long; the model was fine-tuned on "
                    f"messages of at most {answer['limit']} tokens (its context allows no more "
                    "than it was trained on), so only the first "
                    f"{answer['used_tokens']} tokens were read.", icon="✂️")

# ---------------------------------------------------------------------------- 6. side by side
finished = [r for r in classifier_runs if (r.path / "results.json").is_file()]
st.header("6 · Side by side: what does pre-training buy?")
st.caption("What to expect (measured on a 2-core CPU, 300 steps from a 5-minute `base` run): with "
           "**head** only learning, pre-trained features reach ~86 % test accuracy and random ones "
           "~76 %; with **all** weights learning both reach ~97 % — spam is easy enough that a "
           "small network learns it from scratch. Pre-training pays most when little can change.")
if len(finished) < 2:
    st.caption("Fine-tune a second run to compare — for example the same start run with "
               "**random** starting weights, or another freeze mode.")
    st.stop()
ids = [r.id for r in finished]
c1, c2 = st.columns(2)
left_id = c1.selectbox("Run A", ids, index=0, key="classify_cmp_a")
right_id = c2.selectbox("Run B", ids, index=1, key="classify_cmp_b")
rows, curves = [], []
for column, run_id in ((c1, left_id), (c2, right_id)):
    run = next(r for r in finished if r.id == run_id)
    info = run.config.get("classifier", {})
    res = C.read_results(run_id) or {}
    rows.append({"run": run_id, "start": ("random: " if info.get("random_init") else "") + str(info.get("start_run")),
                 "freeze": info.get("freeze"), "steps": res.get("steps"),
                 "train acc": res.get("train_accuracy"), "val acc": res.get("val_accuracy"),
                 "test acc": res.get("test_accuracy"), "test loss": res.get("test_loss")})
    curves += [{"step": m["step"], "val accuracy": m["val_accuracy"], "run": run_id}
               for m in run.metrics() if m.get("val_accuracy") is not None]
st.dataframe(pd.DataFrame(rows), hide_index=True, key="classify_cmp_table",
             column_config={k: st.column_config.NumberColumn(k, format="percent")
                            for k in ("train acc", "val acc", "test acc")})
if curves:
    chart = alt.Chart(pd.DataFrame(curves)).mark_line(point=True).encode(
        x="step:Q", y=alt.Y("val accuracy:Q", scale=alt.Scale(domain=[0.4, 1]), axis=alt.Axis(format="%")),
        color=alt.Color("run:N", title=None))
    st.altair_chart(chart.properties(height=260), key="classify_cmp_chart")
