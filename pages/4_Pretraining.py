"""Stage 4 — pre-training: a GPT learns to predict the next token, and the learner watches it happen.

Pick a corpus, a tokeniser, a preset and a budget; a background job trains while the loss curve,
the learning rate and the samples move. The pipeline is `core.stages.pretrain`; the step that runs
is `core.gpt.train.train_step`.
"""

import math

import streamlit as st

from core.stages import pretrain as stage
from pages._ui import (escape, owner, page_header, remembered_run, run_ids_with_pending, run_name_input, show_error,
                       show_everyone, waiting_to_start)
from pages._ui.charts import curves_figure, expected_vs_yours
from pages._ui.code import code_behind
from pages._ui.history import history_panel
from pages._ui.microscope import microscope_panel
from pages._ui.live import live_panel

PAGE_KEY = "pretrain_run"

page_header(4, "The model reads a window of tokens and guesses, at every position, the token that "
               "comes next. The loss says how surprised it was by the real one: ln(vocabulary) for a "
               "model that knows nothing, falling as it learns letters, words and style.")


def fmt_seconds(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    return f"{int(round(seconds)) // 60}:{int(round(seconds)) % 60:02d}"


def fmt_count(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e4 else f"{n:,.0f}"


# ---------------------------------------------------------------------------- 1. set up a run
st.header("1 · Set up a training run")
corpora, tokenizers = stage.corpora(owner(), show_everyone()), stage.tokenizer_choices()
presets = stage.TRAINABLE_PRESETS
c1, c2, c3 = st.columns(3)
corpus = c1.selectbox("Corpus", corpora, index=corpora.index("tinyshakespeare") if "tinyshakespeare" in corpora else 0,
                      key="pt_corpus", help="Text sources from stage 1 that are on this machine.")
tokenizer = c2.selectbox("Tokeniser", list(tokenizers), format_func=tokenizers.get, key="pt_tokenizer",
                         help="Characters learn fastest on a small CPU; our BPE packs ~3 characters "
                              "per token, so a 256-token context sees more text.")
preset = c3.selectbox("Model preset", presets, index=presets.index("small") if "small" in presets else 0,
                      key="pt_preset", help="Stage 3 shows what each preset is made of.")
shape, defaults = stage.preset_summary(preset, tokenizer), stage.recipe(preset)
st.caption(f"**{preset}**: {shape['n_layer']} blocks × {shape['n_embd']} wide, {shape['n_head']} heads, "
           f"context {shape['context_length']} tokens — about {fmt_count(shape['parameters'])} parameters "
           "with this tokeniser.")
if shape["context_length"] >= 256 and tokenizer == "char":
    st.warning("A 256-token context of single characters covers only ~4 lines of text and, measured "
               "here, sits on a loss plateau near 2.5 for minutes. Pick our BPE (or a stage-1 BPE "
               "run): each token then holds ~2.5–3 characters.", icon="💡")

with st.expander("Training settings", expanded=False):
    s1, s2, s3 = st.columns(3)
    budget_kind = s1.radio("Budget", ["minutes", "steps"], horizontal=True, key=f"pt_budget_kind_{preset}",
                           help="Minutes: the learning-rate schedule ends exactly when the time is up.")
    if budget_kind == "minutes":
        budget = s1.number_input("Minutes", 0.1, 120.0, 3.0, 0.5, key=f"pt_minutes_{preset}")
    else:
        budget = s1.number_input("Steps", 1, 200_000, int(defaults.get("max_steps") or 1000), 100,
                                 key=f"pt_steps_{preset}")
    batch_default, lr_default = defaults.get("batch_size", 32), defaults.get("lr", 1e-3)
    batch_size = s2.select_slider("Batch size (sequences)", sorted({4, 8, 16, 32, 64, batch_default}),
                                  value=batch_default, key=f"pt_batch_{preset}")
    lr = s2.select_slider("Peak learning rate", sorted({3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 6e-3, 1e-2, lr_default}),
                          value=lr_default, key=f"pt_lr_{preset}", format_func=lambda v: f"{v:.0e}")
    warmup = s2.number_input("Warm-up steps", 0, 5000, int(defaults.get("warmup_steps", 50)), key=f"pt_warmup_{preset}")
    eval_every = s3.number_input("Validation loss every … steps", 1, 10_000, int(defaults.get("eval_every", 100)),
                                 key=f"pt_eval_{preset}")
    sample_every = s3.number_input("Text sample every … steps", 1, 10_000, int(defaults.get("sample_every", 200)),
                                   key=f"pt_sample_{preset}")
    st.caption("Defaults: the preset's tuned recipe. AdamW (weight decay on matrices only), a linear "
               "warm-up then a cosine down to a tenth-ish of the peak, gradient clipping at 1.0.")
code_behind(*stage.CODE["learning rate"], title="The code behind this: the learning-rate schedule")

r1, r2 = st.columns([3, 1])
run_name = run_name_input(r1, "pretrain", key="pt_run_name")
if r2.button("Start training", type="primary", key="pt_start"):
    try:
        budget_args = {"minutes": float(budget)} if budget_kind == "minutes" else {"steps": int(budget)}
        settings = stage.Settings(data=corpus, tokenizer=tokenizer, preset=preset, batch_size=int(batch_size),
                                  lr=float(lr), warmup=int(warmup), eval_every=int(eval_every),
                                  sample_every=int(sample_every), run_id=run_name, **budget_args)
        stage.start(settings, run_name, owner=owner())
    except stage.GlassBoxError as e:
        show_error(e)
    else:
        st.session_state[PAGE_KEY] = run_name
        del st.session_state["pt_run_name"]  # a fresh name for the next run
        st.rerun()

# ---------------------------------------------------------------------------- 2. watch it learn
run_ids = run_ids_with_pending(("pretrain",), "pretrain")
if not run_ids:
    st.info("No pre-training run yet. Start one above: the loss curve, the learning rate and the "
            "samples appear here while it trains. On the command line: "
            "`python -m core pretrain --data tinyshakespeare --tokenizer char --preset small --run-id my-first`.",
            icon="💡")
    st.stop()

st.header("2 · Watch it learn")
default = remembered_run(PAGE_KEY, ("pretrain",), "pretrain")
shown = st.selectbox("Run", run_ids, index=run_ids.index(default) if default in run_ids else 0, key="pt_shown")
st.session_state[PAGE_KEY] = shown


def draw_live(run_id: str) -> None:
    """Headline figures, the loss curve, the learning rate and the samples of one run."""
    if waiting_to_start(run_id):
        return
    try:
        result = stage.results(run_id)
    except stage.GlassBoxError as e:
        show_error(e)
        return
    summary, metrics = result["summary"], result["metrics"]
    m = st.columns(6)
    m[0].metric("step", f"{summary['step']:,}")
    m[1].metric("tokens seen", fmt_count(summary["tokens"]))
    m[2].metric("tokens / s", fmt_count(summary["tokens_per_s"]))
    m[3].metric("elapsed", fmt_seconds(summary["elapsed_s"]))
    m[4].metric("ETA", fmt_seconds(summary["eta_s"]) if result["state"] in ("running", "queued") else "—")
    m[5].metric("val loss", f"{summary['val_loss']:.3f}" if summary["val_loss"] is not None else "—")
    if summary["fraction"] is not None:
        st.progress(min(1.0, summary["fraction"]))
    if not metrics:
        st.caption("The first point appears a few seconds after the start (Python has to load PyTorch).")
        return
    ref, band = result["reference"], result["reference_band"]
    st.plotly_chart(curves_figure([("train", metrics, "train_loss"), ("validation", metrics, "val_loss")],
                                  y_title="loss (cross-entropy, nats)", height=360, band=band),
                    key="pt_loss_chart", width="stretch")
    expected_vs_yours({"reference": ref, "health": result["health"] + [m for m in [result["device_message"]] if m]})
    vocab = result["config"].get("vocab_size")
    if vocab:
        st.caption(f"A model that guesses uniformly scores ln({vocab}) = {math.log(vocab):.2f}. Validation "
                   "loss: the same held-out windows every time, so it moves only when the model does.")
    code_behind(*stage.CODE["loss curve"], title="The code behind this: the training step that is running")
    left, right = st.columns([1, 2])
    left.plotly_chart(curves_figure([("learning rate", metrics, "lr")], y_title="learning rate", height=240),
                      key="pt_lr_chart", width="stretch")
    rows = [{"step": s.get("step"), "tokens seen": fmt_count(s.get("tokens")), "text": s.get("text", "")}
            for s in reversed(result["samples"][-50:])]
    if rows:
        right.dataframe(rows, hide_index=True, key="pt_samples_table", width="stretch",
                        column_config={"text": st.column_config.TextColumn("sample (newest first)", width="large")})
    else:
        right.caption("Samples appear at step 1 (noise) and then every few hundred steps.")


live_panel(shown, draw_live, key="pt_live")
st.subheader("Travel back in time")
st.caption("Snapshots of the weights at steps 0, 10, 30, 100, 300, … and the last: pick one to see what the "
           "model knew then. Digits, vowels and capitals drift together on the map as it learns.")
history_panel(shown, key="pt_history")
microscope_panel(shown, key="pt_scope", default_prompt="ROMEO:")

# ---------------------------------------------------------------------------- 3. compare runs
st.header("3 · Compare runs")
st.caption("Overlay two or more runs — say `tiny` against `small`, or characters against BPE — to feel "
           "what scale buys. (A BPE token holds ~3 characters, so its loss per token is naturally higher.)")
compare_ids = stage.run_ids()
chosen = st.multiselect("Runs", compare_ids, default=compare_ids[:2], key="pt_compare")
x_axis = st.radio("Against", ["step", "tokens", "elapsed_s"], horizontal=True, key="pt_compare_x",
                  format_func={"step": "steps", "tokens": "tokens seen", "elapsed_s": "seconds"}.get)
compared = [stage.results(run_id) for run_id in chosen]
if compared:
    series = [(f"{r['run_id']} ({escape(str(r['config'].get('preset', '?')))}) · {kind}", r["metrics"], key)
              for r in compared for kind, key in (("train", "train_loss"), ("validation", "val_loss"))]
    st.plotly_chart(curves_figure(series, x_key=x_axis, height=420), key="pt_compare_chart", width="stretch")
    st.dataframe([{"run": r["run_id"], "preset": r["config"].get("preset"), "tokeniser": r["config"].get("tokenizer"),
                   "state": r["state"], "steps": r["summary"]["step"], "tokens": r["summary"]["tokens"],
                   "seconds": round(r["summary"]["elapsed_s"] or 0, 1),
                   "val loss": round(r["summary"]["val_loss"], 4) if r["summary"]["val_loss"] is not None else None}
                  for r in compared], hide_index=True, key="pt_compare_table")
