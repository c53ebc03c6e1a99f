"""Stage 5 — fine-tuning for classification: data, a fine-tuning job with live curves (the kept
best-validation step marked), test results, your own message, two runs side by side.
The lesson is core/gpt/classify.py; this page calls core/stages/classify.py and draws."""

import pandas as pd
import streamlit as st

from core.stages import classify as stage
from core.stages.classify import CODE, GlassBoxError
from pages._ui import escape, page_header, remembered_run, run_name_input, show_error, start_stage_job
from pages._ui.charts import curves_figure, expected_vs_yours
from pages._ui.code import code_behind
from pages._ui.history import history_panel
from pages._ui.live import live_panel
from pages._ui.model_figures import heatmap, top_bars

PAGE_KEY = "classify_run"

page_header(5, "A pre-trained model already turns text into useful features. Swap its output layer "
               "(one score per vocabulary entry) for a tiny one with two scores — ham, spam — and "
               "teach it with a few hundred labelled messages.")

# ---------------------------------------------------------------------------- 1. the data
st.header("1 · The data: 747 spam messages, and as many ham")
try:
    overview = st.cache_data(show_spinner=False)(stage.data_overview)("sms-spam")
except GlassBoxError as e:
    show_error(e)
    overview = None
if overview:
    for col, (label, value) in zip(st.columns(5), overview["metrics"]):
        col.metric(label, value)
    st.caption("The UCI SMS Spam Collection has 4,827 ham and 747 spam messages: a model "
               "that always says *ham* would score 87 %. So ham is **under-sampled** to the number of spam "
               "messages (fixed seed), and the 1,494 messages are split 70 / 10 / 20. Each message is padded "
               "(or cut) to one length; the model answers at its **last real token** — the only position "
               "that has seen every word.")
    st.dataframe(pd.DataFrame(overview["samples"]), hide_index=True, key="classify_samples")
code_behind(*CODE["data"])

# ---------------------------------------------------------------------------- 2. start a run
st.header("2 · Fine-tune a model")
labels = stage.start_runs()
if not labels:
    st.info("**No pre-trained model yet.** Fine-tuning starts from a language model: pre-train one on "
            "**stage 4** (the `base` preset for 5 minutes is enough — on the command line: "
            "`python -m core pretrain --preset base --minutes 5 --run-id base`) or import weights on "
            "**stage 3**. Then come back here.", icon="💡")
else:
    start_run = st.selectbox("Start from", list(labels), format_func=labels.get, key="classify_start")
    st.markdown(stage.COSTS_CAPTION)
    timed = st.toggle("Measure step times", key="classify_time")
    st.dataframe(st.cache_data(show_spinner="Measuring…", max_entries=8)(stage.choice_costs)(
        start_run, int(st.session_state.get("classify_rank", 8)), time_steps=2 * timed), hide_index=True, key="classify_costs")
    with st.form("classify_settings"):
        init = st.radio("Starting weights", ["pre-trained", "random"], horizontal=True,
                        help="Random: the same architecture and tokeniser with fresh random weights — the "
                             "control experiment that shows what pre-training buys.")
        modes = [*stage.FREEZE_MODES, "lora"]
        freeze = st.radio("What learns", modes, index=modes.index(stage.DEFAULT_FREEZE), horizontal=False,
                          format_func=lambda m: f"{m}: {stage.FREEZE_HELP[m]}")
        c3, c4, c5 = st.columns(3)
        budget = c3.radio("Budget", ["steps", "minutes"], horizontal=True)
        amount = c3.number_input("How many", min_value=1.0, max_value=10000.0, value=float(stage.DEFAULT_STEPS),
                                 step=1.0, help="Steps (one batch each) or minutes. The weights kept are those "
                                                "of the best validation loss, so more never makes it worse.")
        batch = c4.select_slider("Batch size", [4, 8, 16, 32], value=16)
        lr = c4.select_slider("Learning rate", [5e-5, 1e-4, 3e-4, 5e-4, 1e-3, 3e-3], value=1e-3,
                              help="Small models from stage 4 like 1e-3; GPT-2 prefers 5e-5 (LoRA: 1e-3).")
        max_length = c5.number_input("Pad / truncate to (tokens, 0 = automatic)", 0, 4096, 0,
                                     help="Automatic: the longest training message, at most the context length.")
        run_id = run_name_input(c5, "classify", key="classify_run_name")
        l1, l2, l3 = st.columns(3)
        l1.number_input("LoRA rank", 1, 256, 8, key="classify_rank", help="Only for 'lora': the rank r of B A.")
        alpha = l2.number_input("LoRA alpha", 0.5, 512.0, 8.0, help="The update is scaled by alpha / r.")
        targets = l3.multiselect("LoRA matrices", list(stage.LORA_TARGETS), default=list(stage.LORA_TARGETS))
        go_ = st.form_submit_button("Start fine-tuning", type="primary")
    if go_:
        start_stage_job(stage, lambda: stage.page_settings(
            start_run, init == "random", freeze, budget, amount, batch, lr, max_length, run_id,
            st.session_state.classify_rank, alpha, targets), run_id, PAGE_KEY, "classify_run_name")

# ---------------------------------------------------------------------------- 3. watch it learn
default = remembered_run(PAGE_KEY, ("classify",), "classify")
run_ids = ([default] if default else []) + [r.id for r in stage.classifier_runs() if r.id != default]
if not run_ids:
    st.caption("No fine-tuning run yet: the curves, results and the message tester appear here once one has started.")
    st.stop()
st.header("3 · Watch it learn")
shown = st.selectbox("Classifier run", run_ids, index=run_ids.index(default) if default in run_ids else 0,
                     key="classify_shown")
st.session_state[PAGE_KEY] = shown


def draw(run_id: str) -> None:
    info = stage.run_info(run_id)
    if info is None:
        st.caption("Loading the start model and tokenising the messages…")
        return
    start = ("random weights shaped like " if info.get("random_init") else "") + str(info.get("start_run", "?"))
    st.markdown(f"from **{escape(start)}** · learns **{escape(info.get('freeze', '?'))}** · "
                f"{info.get('trainable_parameters', 0):,} of {info.get('parameters', 0):,} parameters learn · "
                f"messages padded to {info.get('pad_length', '?')} tokens")
    metrics, kept = stage.curves(run_id)
    if not metrics:
        st.caption("The curves appear after the first steps.")
        return
    expected = stage.expected(run_id, metrics)
    left, right = st.columns(2)
    left.plotly_chart(curves_figure([("train", metrics, "train_loss"), ("validation", metrics, "val_loss")],
                                    height=260, marker_step=kept, band=expected["band"]), key="classify_loss_chart")
    right.plotly_chart(curves_figure([("train", metrics, "train_accuracy"), ("validation", metrics, "val_accuracy")],
                                     height=260, y_title="accuracy", percent=True, marker_step=kept),
                       key="classify_accuracy_chart")
    st.caption(f"Accuracies at each evaluation (validation: every message; train: the same {stage.TRAIN_ACCURACY_SUBSET} "
               "messages each time). The dotted line: the step whose weights the run keeps (best validation loss).")
    expected_vs_yours(expected)


live_panel(shown, draw, key="classify")
history_panel(shown, key="classify_history")  # the time slider: the classifier at each snapshot step

# ---------------------------------------------------------------------------- 4. results
try:
    results = stage.results(shown)
except GlassBoxError as e:
    show_error(e)
    results = None
if results is None:
    st.caption("Test accuracy, the confusion matrix and the wrong messages appear when the run finishes.")
else:
    st.header("4 · How well does it do?")
    if results.get("stopped"):
        st.warning(f"This run was stopped at step {results.get('steps')}: these are the results of the model "
                   "as it was then. Resume it to continue.", icon="⏸️")
    c = st.columns(4)
    c[0].metric("test accuracy", f"{results['test_accuracy']:.1%}")
    c[1].metric("validation accuracy", f"{results['val_accuracy']:.1%}")
    c[2].metric("train accuracy", f"{results['train_accuracy']:.1%}")
    c[3].metric("steps", results.get("steps", "?"), help=f"weights kept from step {results.get('weights_step')}")
    st.caption("The book reports 95.67 % test accuracy fine-tuning GPT-2 small (124M parameters). Train "
               "accuracy far above test accuracy means the model memorises the training set.")
    code_behind(*CODE["model"])
    left, right = st.columns([2, 3])
    with left:
        st.subheader("Confusion matrix (test)")
        names = results.get("labels", ["ham", "spam"])
        st.plotly_chart(heatmap(results["confusion_matrix"], names, names, colorscale="Blues", digits=0, height=240),
                        key="classify_confusion")
    with right:
        st.subheader(f"Misclassified test messages ({results.get('misclassified_count', 0)})")
        wrong = results.get("misclassified", [])
        if wrong:  # st.dataframe shows text as text (never as HTML): no escaping needed here
            st.dataframe(pd.DataFrame(stage.misclassified_table(results)), hide_index=True, height=260,
                         key="classify_wrong", column_config={"P(spam)": st.column_config.ProgressColumn(
                             "P(spam)", min_value=0.0, max_value=1.0, format="%.2f")})
        else:
            st.success("Every test message was classified correctly.")
    code_behind(*CODE["results"])

# ---------------------------------------------------------------------------- 5. your message
st.header("5 · Try your own message")
with st.form("classify_own"):
    message = st.text_area("Message", placeholder="Congratulations! You have won a free cruise. Text WIN to 80086 now.")
    ask = st.form_submit_button("Classify", type="primary")
if ask:
    try:
        answer = stage.classify_message(shown, message)
    except GlassBoxError as e:
        show_error(e)
    else:
        probs = answer["probabilities"]
        st.markdown(f"The model says **{escape(answer['label'])}** ({probs[answer['label']]:.1%}).")
        st.plotly_chart(top_bars(list(probs.values()), list(probs), "", "probability"), key="classify_own_chart")
        if answer["truncated"]:
            st.info(f"Your message is {answer['tokens']} tokens long; the model was fine-tuned on messages of at "
                    f"most {answer['limit']} tokens, so only the first {answer['used_tokens']} tokens were read.",
                    icon="✂️")
        code_behind(*CODE["message"])

# ---------------------------------------------------------------------------- 6. side by side
finished = [r.id for r in stage.classifier_runs() if stage.readable_results(r.id)]
st.header("6 · Side by side: what does pre-training buy?")
st.caption("With **head** only learning pre-trained features beat random ones clearly; with **all** both do well.")
if len(finished) < 2:
    st.caption("Fine-tune a second run to compare: the same start with **random** weights, or another choice.")
    st.stop()
c1, c2 = st.columns(2)
pair = [c1.selectbox("Run A", finished, index=0, key="classify_cmp_a"),
        c2.selectbox("Run B", finished, index=1, key="classify_cmp_b")]
st.dataframe(pd.DataFrame(stage.comparison(pair)), hide_index=True, key="classify_cmp_table",
             column_config={k: st.column_config.NumberColumn(k, format="percent")
                            for k in ("train acc", "val acc", "test acc")})
st.plotly_chart(curves_figure([(run_id, stage.curves(run_id)[0], "val_accuracy") for run_id in pair],
                              y_title="validation accuracy", percent=True), key="classify_cmp_chart")
