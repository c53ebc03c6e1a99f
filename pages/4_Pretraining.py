"""Stage 4 — pre-training: a GPT learns to predict the next token, and the learner watches it happen.

The learner picks a corpus, a tokeniser (from stage 1, characters or GPT-2's), a model preset
(stage 3) and a training budget, then starts a background job. While it runs, the loss curve
(train and validation) moves every second, with tokens/s, tokens seen, elapsed time and ETA; the
learning-rate schedule and the samples show the text turning from noise into words. Several runs
can be overlaid to feel what a bigger model or a longer run buys. The logic is in core/train.py and
core/gpt/pretrain.py; the job is `python -m core pretrain ...` (core/stages/pretrain.py).
"""

import math

import plotly.graph_objects as go
import streamlit as st

from core.lab import data, runs
from core.gpt.errors import GlassBoxError
from core.gpt.model import PRESETS, count_parameters, preset_config
from core.gpt.pretrain import recipe
from core.gpt.train import downsample, progress_summary
from pages._ui import (escape, job_controls, page_header, remembered_run, run_ids_with_pending, show_error,
                       run_name_input, start_job, waiting_to_start)

PAGE_KEY = "pretrain_run"
TRAINABLE_PRESETS = [name for name, p in PRESETS.items() if "vocab_size" not in p]  # not GPT-2's shapes
COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"]

page_header(4, "The model reads a window of tokens and guesses, at every position, the token that "
               "comes next. The loss says how surprised it was by the real one: ln(vocabulary) for a "
               "model that knows nothing, falling as it learns letters, words and style.")


def fmt_seconds(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def fmt_count(n) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e4 else f"{n:,.0f}"


# ---------------------------------------------------------------------------- 1. set up a run
st.header("1 · Set up a training run")

try:
    corpora = [s["name"] for s in data.list_sources()
               if s.get("kind") == "text" and (s.get("available") or s["name"] == "python-docs")]
except GlassBoxError as e:
    show_error(e)
    corpora = ["python-docs"]
corpora = corpora or ["python-docs"]
tokenizer_runs = [r for r in runs.list_runs("tokenizer") if not r.error]
tokenizer_labels = {"char": "characters (trained on the corpus, ~65 tokens)",
                    "bpe:1000": "our BPE, 1,000 tokens (trained on the corpus when the job starts)",
                    "gpt2": "GPT-2's 50,257 tokens (slow to train from scratch)"}
for r in tokenizer_runs:
    tokenizer_labels[r.id] = (f"stage-1 run {r.id} ({r.config.get('tokenizer', '?')}, "
                              f"{r.config.get('vocab_size', '?')} tokens, from {r.config.get('data', '?')})")

c1, c2, c3 = st.columns(3)
corpus = c1.selectbox("Corpus", corpora, index=corpora.index("tinyshakespeare") if "tinyshakespeare" in corpora else 0,
                      key="pt_corpus", help="Text sources from stage 1 that are on this machine.")
tokenizer = c2.selectbox("Tokeniser", list(tokenizer_labels), format_func=tokenizer_labels.get,
                         key="pt_tokenizer",
                         help="Characters learn fastest on a small CPU; our BPE packs ~3 characters "
                              "per token, so a 256-token context sees more text.")
preset = c3.selectbox("Model preset", TRAINABLE_PRESETS,
                      index=TRAINABLE_PRESETS.index("small") if "small" in TRAINABLE_PRESETS else 0,
                      key="pt_preset", help="Stage 3 shows what each preset is made of.")
shape = PRESETS[preset]
defaults = recipe(preset)
vocab_guess = {"char": 65, "bpe:1000": 1000, "gpt2": 50257}.get(
    tokenizer, next((r.config.get("vocab_size", 1000) for r in tokenizer_runs if r.id == tokenizer), 1000))
try:
    n_params = sum(count_parameters(preset_config(preset, vocab_guess)).values())
except GlassBoxError:
    n_params = None
st.caption(f"**{preset}**: {shape['n_layer']} blocks × {shape['n_embd']} wide, {shape['n_head']} heads, "
           f"context {shape['context_length']} tokens — about {fmt_count(n_params)} parameters with this "
           "tokeniser.")

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
    batch_default = defaults.get("batch_size", 32)
    batch_size = s2.select_slider("Batch size (sequences)", sorted({4, 8, 16, 32, 64, batch_default}),
                                  value=batch_default, key=f"pt_batch_{preset}")
    lr_default = defaults.get("lr", 1e-3)
    lr = s2.select_slider("Peak learning rate", sorted({3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 6e-3, 1e-2, lr_default}),
                          value=lr_default, key=f"pt_lr_{preset}", format_func=lambda v: f"{v:.0e}")
    warmup = s2.number_input("Warm-up steps", 0, 5000, int(defaults.get("warmup_steps", 50)),
                             key=f"pt_warmup_{preset}")
    eval_every = s3.number_input("Validation loss every … steps", 1, 10_000,
                                 int(defaults.get("eval_every", 100)), key=f"pt_eval_{preset}")
    sample_every = s3.number_input("Text sample every … steps", 1, 10_000,
                                   int(defaults.get("sample_every", 200)), key=f"pt_sample_{preset}")
    st.caption("Defaults: the preset's tuned recipe. AdamW (weight decay on matrices only), a linear "
               "warm-up then a cosine down to a tenth-ish of the peak, gradient clipping at 1.0.")

r1, r2 = st.columns([3, 1])
run_name = run_name_input(r1, "pretrain", key="pt_run_name")
if r2.button("Start training", type="primary", key="pt_start"):
    try:
        runs.validate_run_id(run_name)
    except GlassBoxError as e:
        show_error(e)
    else:
        argv = ["pretrain", "--data", corpus, "--tokenizer", tokenizer, "--preset", preset,
                "--batch-size", str(batch_size), "--lr", str(lr), "--warmup", str(int(warmup)),
                "--eval-every", str(int(eval_every)), "--sample-every", str(int(sample_every)),
                "--run-id", run_name]
        argv += ["--minutes", str(budget)] if budget_kind == "minutes" else ["--steps", str(int(budget))]
        if start_job(argv, run_name):
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
shown = st.selectbox("Run", run_ids, index=run_ids.index(default) if default in run_ids else 0,
                     key="pt_shown")
st.session_state[PAGE_KEY] = shown


def loss_figure(series: list[tuple[str, list[dict]]], x_key: str = "step", height: int = 360) -> go.Figure:
    """Train (thin line) and validation (dots + line) loss of one or more runs."""
    fig = go.Figure()
    for i, (name, metrics) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        train_rows = downsample([m for m in metrics if m.get("train_loss") is not None])
        val_rows = [m for m in metrics if m.get("val_loss") is not None]
        label = f"{name} · " if len(series) > 1 else ""
        fig.add_trace(go.Scatter(x=[m.get(x_key) for m in train_rows], y=[m["train_loss"] for m in train_rows],
                                 mode="lines", name=f"{label}train", line=dict(color=colour, width=1.5),
                                 opacity=0.55))
        fig.add_trace(go.Scatter(x=[m.get(x_key) for m in val_rows], y=[m["val_loss"] for m in val_rows],
                                 mode="lines+markers", name=f"{label}validation",
                                 line=dict(color=colour, width=2.5, dash="dot"), marker=dict(size=7)))
    titles = {"step": "step", "tokens": "tokens seen", "elapsed_s": "seconds"}
    fig.update_layout(height=height, margin=dict(l=10, r=10, t=30, b=10), xaxis_title=titles[x_key],
                      yaxis_title="loss (cross-entropy, nats)", legend=dict(orientation="h", y=1.12),
                      uirevision="keep")  # keep the user's zoom across live updates
    return fig


def lr_figure(metrics: list[dict]) -> go.Figure:
    rows = downsample([m for m in metrics if m.get("lr") is not None])
    fig = go.Figure(go.Scatter(x=[m["step"] for m in rows], y=[m["lr"] for m in rows], mode="lines",
                               line=dict(color="#9333ea")))
    fig.update_layout(height=220, margin=dict(l=10, r=10, t=10, b=10), xaxis_title="step",
                      yaxis_title="learning rate", yaxis_exponentformat="e", uirevision="keep")
    return fig


def open_shown(run_id: str):
    try:
        return runs.open_run(run_id)
    except GlassBoxError as e:
        show_error(e)
        return None


@st.fragment(run_every=1)
def live_loss(run_id: str) -> None:
    """Job state, headline figures and the loss curve: redrawn every second."""
    job_controls(run_id, key="pt_job")
    if waiting_to_start(run_id):
        return
    run = open_shown(run_id)
    if run is None:
        return
    metrics = run.metrics()
    summary = progress_summary(metrics, run.config.get("train"))
    m = st.columns(6)
    m[0].metric("step", f"{summary['step']:,}")
    m[1].metric("tokens seen", fmt_count(summary["tokens"]))
    m[2].metric("tokens / s", fmt_count(summary["tokens_per_s"]))
    m[3].metric("elapsed", fmt_seconds(summary["elapsed_s"]))
    m[4].metric("ETA", fmt_seconds(summary["eta_s"]) if run.status.get("state") in ("running", "queued") else "—")
    m[5].metric("val loss", f"{summary['val_loss']:.3f}" if summary["val_loss"] is not None else "—")
    if summary["fraction"] is not None:
        st.progress(min(1.0, summary["fraction"]))
    if not metrics:
        st.caption("The first point appears a few seconds after the start (Python has to load PyTorch).")
        return
    st.plotly_chart(loss_figure([(run_id, metrics)]), key="pt_loss_chart", width="stretch")
    vocab = run.config.get("vocab_size")
    if vocab:
        st.caption(f"A model that guesses uniformly scores ln({vocab}) = {math.log(vocab):.2f}. "
                   "Train loss: the mean of the steps since the previous point; validation loss: the "
                   "same held-out windows every time, so the dotted line moves only when the model does.")


@st.fragment(run_every=2)
def live_schedule(run_id: str) -> None:
    if not (runs.run_dir(run_id) / "config.json").exists():
        return  # still starting: live_loss says so
    run = open_shown(run_id)
    if run is None:
        return
    metrics = run.metrics()
    if metrics:
        st.plotly_chart(lr_figure(metrics), key="pt_lr_chart", width="stretch")
    else:
        st.caption("The learning rate the optimiser used at each step appears here.")


@st.fragment(run_every=2)
def live_samples(run_id: str) -> None:
    if not (runs.run_dir(run_id) / "config.json").exists():
        return  # still starting: live_loss says so
    run = open_shown(run_id)
    if run is None:
        return
    samples = run.samples()
    if not samples:
        st.caption("Samples appear at step 1 (noise) and then every few hundred steps.")
        return
    rows = [{"step": s.get("step"), "tokens seen": fmt_count(s.get("tokens")), "text": s.get("text", "")}
            for s in reversed(samples[-50:])]
    st.dataframe(rows, hide_index=True, key="pt_samples_table", width="stretch",
                 column_config={"text": st.column_config.TextColumn("sample (newest first)", width="large")})


live_loss(shown)
left, right = st.columns([1, 2])
with left:
    st.subheader("Learning rate")
    live_schedule(shown)
with right:
    st.subheader("Samples")
    live_samples(shown)

# ---------------------------------------------------------------------------- 3. compare runs
st.header("3 · Compare runs")
st.caption("Overlay two or more runs — say `tiny` against `small`, or characters against BPE — to "
           "feel what scale buys. Against seconds, a bigger model must also pay for its size. "
           "(Runs with different tokenisers are not measured in the same units: a BPE token holds "
           "~3 characters, so its loss per token is naturally higher.)")
pretrain_runs = [r for r in runs.list_runs("pretrain") if not r.error]
compare_ids = [r.id for r in pretrain_runs]
chosen = st.multiselect("Runs", compare_ids, default=compare_ids[:2],
                        key="pt_compare")
x_axis = st.radio("Against", ["step", "tokens", "elapsed_s"], horizontal=True, key="pt_compare_x",
                  format_func={"step": "steps", "tokens": "tokens seen", "elapsed_s": "seconds"}.get)
series = []
for run_id in chosen:
    run = next((r for r in pretrain_runs if r.id == run_id), None)
    if run is not None:
        label = f"{run_id} ({escape(run.config.get('preset', '?'))}, {escape(run.config.get('tokenizer', '?'))})"
        series.append((label, run.metrics()))
if series:
    st.plotly_chart(loss_figure(series, x_axis, height=420), key="pt_compare_chart", width="stretch")
    table = []
    for run_id in chosen:
        run = next(r for r in pretrain_runs if r.id == run_id)
        s = progress_summary(run.metrics(), run.config.get("train"))
        table.append({"run": run_id, "preset": run.config.get("preset"), "tokeniser": run.config.get("tokenizer"),
                      "state": run.state, "steps": s["step"], "tokens": s["tokens"],
                      "seconds": round(s["elapsed_s"] or 0, 1),
                      "val loss": round(s["val_loss"], 4) if s["val_loss"] is not None else None})
    st.dataframe(table, hide_index=True, key="pt_compare_table")
