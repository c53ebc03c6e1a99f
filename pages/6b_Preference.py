"""Beyond the seven stages — preference tuning (DPO): the instruction-tuned model learns which of
two answers people prefer (polite over rude), measured against a frozen copy of itself.

Pick a start run, β and what trains (LoRA adapters or every weight); a background job runs
`core.stages.prefer`, whose loss is `core.gpt.prefer.dpo_loss`. The curves come from the job's
metrics; at the end both models answer held-out instructions side by side.
"""

import streamlit as st

from core.stages import prefer as stage
from pages._ui import escape, owner, remembered_run, run_ids_with_pending, run_name_input, show_error, waiting_to_start
from pages._ui.charts import curves_figure
from pages._ui.code import code_behind
from pages._ui.live import live_panel

PAGE_KEY = "prefer_run"

st.title("🤝 Beyond the seven stages: preference tuning (DPO)")
st.caption("Stage 6 showed the model one good answer per instruction. Preference data shows it two — a "
           "polite *chosen* and a rude *rejected* answer — and DPO raises the chosen one's probability "
           "relative to a frozen copy of the model, with no reward model and no reinforcement learning.")
st.info("This page goes beyond the book's seven stages (its bonus DPO notebook). It starts from an "
        "instruction-tuned run: stage 6, or an imported SmolLM2-135M-Instruct or GPT-2.", icon="🧭")

with st.expander("The idea in four lines", expanded=False):
    st.markdown(
        "- **log-prob of an answer** = the sum of log p(token) over the answer's tokens (the prompt is not scored)\n"
        "- **implicit reward** r(y) = β · (log π(y|x) − log π_ref(y|x)): how much more likely the tuned "
        "model π finds the answer than the frozen reference π_ref\n"
        "- **loss** = −log σ(r(chosen) − r(rejected)); at step 0 π = π_ref, so the loss is ln 2 ≈ 0.693\n"
        "- **reward accuracy** = the share of held-out pairs with r(chosen) > r(rejected)")
code_behind(*stage.CODE["loss"], *stage.CODE["log-probs"])

# ---------------------------------------------------------------------------- 1. set up a run
st.header("1 · Set up a preference-tuning run")
starts = stage.start_runs()
if not starts:
    st.warning("No instruction-tuned run yet. Tune one on stage 6, or import SmolLM2-135M-Instruct "
               "(`python -m core import --from smollm2-135m-instruct`).", icon="👉")
else:
    c1, c2, c3 = st.columns(3)
    start = c1.selectbox("Start from (SFT model)", starts, key="dpo_start",
                         help="The model that already follows instructions; it is also the frozen reference.")
    beta = c2.select_slider("β", options=[0.01, 0.05, 0.1, 0.2, 0.5, 1.0], value=0.1, key="dpo_beta",
                            help="Small β lets the model move far from the reference; large β keeps it close.")
    steps = c3.number_input("Steps", 1, 5000, 100, step=10, key="dpo_steps",
                            help="8 preference pairs per step.")
    c4, c5, c6 = st.columns(3)
    mode = c4.radio("What trains", ["LoRA adapters", "every weight"], key="dpo_mode", horizontal=True,
                    help="LoRA trains two thin matrices beside each frozen weight; the reference is "
                         "then the same model with the adapters off (no second copy in memory).")
    lora = mode == "LoRA adapters"
    rank = c5.select_slider("LoRA rank r", options=[1, 2, 4, 8, 16, 32], value=8, key="dpo_rank",
                            disabled=not lora)
    alpha = c6.number_input("LoRA alpha", 0.5, 256.0, 16.0, step=0.5, key="dpo_alpha", disabled=not lora)
    run_id = run_name_input(st, "dpo", key="dpo_run_name")
    if st.button("Start preference tuning", type="primary", key="dpo_go"):
        try:
            settings = stage.Settings(start=start, beta=float(beta), steps=int(steps),
                                      lora_rank=int(rank) if lora else None,
                                      lora_alpha=float(alpha) if lora else None, run_id=run_id)
            stage.start(settings, run_id, owner=owner())
        except stage.GlassBoxError as e:
            show_error(e)
        else:
            st.session_state[PAGE_KEY] = run_id
            del st.session_state["dpo_run_name"]
            st.rerun()

# ---------------------------------------------------------------------------- 2. watch it learn
st.header("2 · Watch the preference being learnt")
options = run_ids_with_pending(("prefer",), stage.COMMAND)
current = remembered_run(PAGE_KEY, ("prefer",), stage.COMMAND)
if not options:
    st.caption("No DPO run yet: start one above, or on the command line: "
               "`python -m core prefer --from RUN --steps 100 --run-id my-dpo`.")
    st.stop()
chosen_run = st.selectbox("Run", options, index=options.index(current) if current in options else 0, key="dpo_view")
st.session_state[PAGE_KEY] = chosen_run


def fmt(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def load_results(run_id: str) -> dict | None:
    try:
        return stage.results(run_id)
    except stage.GlassBoxError as e:
        show_error(e)
    return None


def draw(run_id: str) -> None:
    found = None if waiting_to_start(run_id) else load_results(run_id)
    if found is None:
        return
    start_stats, latest, evals = found["start"] or {}, found["latest"] or {}, found["evals"]
    cfg = found["config"]
    lora_cfg = cfg.get("lora")
    st.caption(f"From **{escape(cfg.get('from'))}**, β = {cfg.get('prefer', {}).get('beta')}, "
               + (f"LoRA rank {lora_cfg['rank']} (alpha {lora_cfg['alpha']:g}) on {', '.join(lora_cfg['targets'])}: "
                  f"{lora_cfg.get('trainable_parameters', 0):,} trainable numbers" if lora_cfg
                  else f"every weight trains ({cfg.get('prefer', {}).get('trainable_parameters', 0):,} numbers)"))
    m = st.columns(4)
    m[0].metric("Held-out DPO loss", fmt(latest.get("val_loss")), help="ln 2 = 0.693 at the start")
    m[1].metric("Reward margin", fmt(latest.get("reward_margin")),
                delta=None if not latest else f"{latest['reward_margin'] - start_stats.get('reward_margin', 0):+.3f}")
    m[2].metric("Reward accuracy", "—" if not latest else f"{latest['reward_accuracy']:.0%}")
    m[3].metric("Step", f"{latest.get('step', 0)} / {cfg.get('train', {}).get('max_steps') or '—'}")
    c1, c2 = st.columns(2)
    c1.plotly_chart(curves_figure([("train (batch)", found["losses"], "train_loss"),
                                   ("held-out", evals, "val_loss")], y_title="DPO loss", height=280),
                    key=f"dpo_loss_{run_id}")
    c2.plotly_chart(curves_figure([("reward margin", evals, "reward_margin"),
                                   ("reward accuracy", evals, "reward_accuracy")], y_title="held-out", height=280),
                    key=f"dpo_reward_{run_id}")
    st.plotly_chart(curves_figure([("chosen", evals, "chosen_logp"), ("rejected", evals, "rejected_logp")],
                                  y_title="log-prob of the answer (policy)", height=260), key=f"dpo_logp_{run_id}")
    st.caption("Does DPO raise *chosen*, or only push *rejected* down? Both curves start at the "
               "reference model's log-probabilities; the margin is β times the gap between their changes.")


live_panel(chosen_run, draw, key="prefer")

# ---------------------------------------------------------------------------- 3. side by side
st.header("3 · SFT and DPO answers, side by side")
rows = stage.responses(chosen_run)
if not rows:
    st.caption("When the run finishes, the starting (SFT) model and the tuned (DPO) model answer the same "
               "held-out test instructions; they appear here. Stage 7 can then judge them pairwise.")
for i, row in enumerate(rows):
    with st.container(border=True):
        st.markdown(f"**{i + 1}. {escape(row['instruction'])}**" + (f"  \n{escape(row['input'])}" if row.get("input") else ""))
        a, b = st.columns(2)
        a.markdown("**SFT (start)**")
        a.text(row["sft_response"] or "(empty)")
        b.markdown("**DPO (tuned)**")
        b.text(row["dpo_response"] or "(empty)")
code_behind(*stage.CODE["task"], *stage.CODE["lora"], title="The code behind this: the DPO task and LoRA")
