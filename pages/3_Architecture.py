"""Stage 3 — The GPT architecture: size a model (GPT-2's or a modern block), follow an input through it, let it
talk (with the microscope), compare two configurations, bring in GPT-2's weights, and quantize a run (fp32,
int8, 4-bit). The lesson is core/gpt/model.py, sizes.py and quantize.py; this page calls core/stages and draws."""

import html

import pandas as pd
import streamlit as st

from core.stages import import_gpt2 as importer
from core.stages import inspect as stage
from core.stages.inspect import PRESETS, GlassBoxError, GPTConfig, human_bytes
from pages._ui import owner, page_header, run_picker, show_error
from pages._ui.code import code_behind
from pages._ui.microscope import microscope_panel
from pages._ui.model_figures import compare_bars, parameter_bar, readable, top_bars
from pages._ui.quantization import quantization_panel

EMBD_OPTIONS = [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 576, 640, 768, 1024, 1280, 1600]
CONTEXT_OPTIONS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
OPTIONAL = ("n_kv_head", "ffn_hidden")  # 0 on the page = None in the config (the GPT-2 default)
DEFAULTS = {"vocab_size": 65, **{k: v for k, v in PRESETS["tiny"].items() if k != "dropout"},
            "qkv_bias": False, "tie_weights": True, "position": "learned", "norm": "layernorm", "mlp": "gelu",
            "n_kv_head": 0, "ffn_hidden": 0, "bias": True}

page_header(3, "A GPT is a stack of identical blocks between an embedding and an output head. "
               "Size one, follow a token through it, and hear what an untrained model says.")


def use_preset(name: str) -> None:
    """Button callback: copy a preset into the controls (before they are drawn)."""
    preset = {**DEFAULTS, **PRESETS[name]}
    preset["vocab_size"] = PRESETS[name].get("vocab_size", stage.PRESET_VOCAB.get(name, 1000))
    for key in DEFAULTS:
        st.session_state[f"cfg_{key}"] = (preset[key] or 0) if key in OPTIONAL else preset[key]


def shape_controls() -> GPTConfig | None:
    for name, value in DEFAULTS.items():
        st.session_state.setdefault(f"cfg_{name}", value)
    for column, name in zip(st.columns(len(PRESETS)), PRESETS):
        column.button(name, key=f"preset_{name}", on_click=use_preset, args=(name,), width="stretch")
    left, middle, right = st.columns(3)
    left.number_input("Vocabulary size (from the tokenizer)", min_value=1, max_value=300_000, step=1, key="cfg_vocab_size")
    left.select_slider("Context length (positions the model can see)", CONTEXT_OPTIONS, key="cfg_context_length")
    left.select_slider("Embedding size n_embd (numbers per token)", EMBD_OPTIONS, key="cfg_n_embd")
    left.slider("Attention heads n_head", 1, 32, key="cfg_n_head")
    left.slider("Transformer blocks n_layer", 1, 48, key="cfg_n_layer")
    middle.radio("Positions", ["learned", "rope"], key="cfg_position", horizontal=True,
                 help="learned: GPT-2's table of position vectors; rope: rotate q and k (stage 2, part 3)")
    middle.radio("Norm", ["layernorm", "rmsnorm"], key="cfg_norm", horizontal=True)
    middle.radio("Feed-forward", ["gelu", "swiglu"], key="cfg_mlp", horizontal=True)
    middle.number_input("Key/value heads (0 = one per query head; fewer = grouped-query)", 0, 32, key="cfg_n_kv_head")
    middle.number_input("Feed-forward width (0 = 4 × n_embd)", 0, 32_768, key="cfg_ffn_hidden")
    right.checkbox("Bias on Q, K, V (GPT-2 has one)", key="cfg_qkv_bias")
    right.checkbox("Biases in the other layers (GPT-2: yes, Llama: no)", key="cfg_bias")
    right.checkbox("Tie the output head to the token embedding", key="cfg_tie_weights")
    values = {name: st.session_state[f"cfg_{name}"] for name in DEFAULTS}
    values.update({name: values[name] or None for name in OPTIONAL})
    try:
        return GPTConfig(**values)
    except GlassBoxError as e:
        show_error(e)
        return None


st.header("1. Choose the shape")
st.write("A preset, or your own numbers. Every count below is arithmetic on these numbers: "
         "nothing is built until you ask for a trace or a sample.")
config = shape_controls()
if config is not None:
    report = stage.shape_report(config)
    m1, m2, m3, m4, m5, m6 = st.columns(6)
    m1.metric("Parameters", f"{report['parameters']:,}")
    m2.metric("Weights in fp32", human_bytes(report["bytes"]))
    # Training holds the weights, their gradients and AdamW's two running averages: 4 copies.
    m3.metric("Training memory (weights + grads + AdamW)", human_bytes(report["training_bytes"]))
    m4.metric("Head size (n_embd / n_head)", report["head_size"])
    m5.metric("FLOPs per token (training)", f"{report['flops_per_token']:,}")
    m6.metric("KV cache per token (fp32)", human_bytes(report["kv_cache_bytes_per_token"]))
    st.plotly_chart(parameter_bar(report["breakdown"]), key="param_bar", width="stretch")
    if config.tie_weights:
        st.caption("Tied: the output head reuses the token-embedding matrix, so it adds no parameters.")
    code_behind(*stage.CODE["parameters"])

st.header("2. Follow one input through the model")
st.write("Each row is a module in the order the data visits it; the last dimension is what the "
         "module produces per token. Blocks repeat: only the numbers inside them differ.")
text = st.text_input("A short input", "To be, or not", key="trace_text", max_chars=200)
if config is not None:
    try:
        traced = stage.trace_text(config, text)
        if traced["logits"] is None:
            st.info(f"{report['parameters']:,} parameters is too many to build inside the app: the shapes below "
                    "come from an empty ('meta') model, so there are no scores to show.")
        ids = traced["ids"]
        st.caption(f"Input: {len(ids)} token ids (the UTF-8 bytes of the text — no tokenizer yet): "
                   f"{html.escape(str(ids[:24]))}{' …' if len(ids) > 24 else ''}")
        st.dataframe(pd.DataFrame(stage.trace_rows(traced["trace"])), hide_index=True, width="stretch",
                     key="trace_table", height=min(36 * (len(traced["trace"]) + 1), 640))
        st.caption("GELU is x·Φ(x) (Φ: the normal CDF); models trained here compute it exactly (3× faster on a "
                   "CPU), GPT-2's weights keep its tanh approximation. SwiGLU gates half of a wider layer with silu "
                   "of the other half. RMSNorm only rescales; LayerNorm also centres. RoPE has no table (wpe).")
        if traced["logits"] is not None:
            values, labels = stage.top_tokens(traced["logits"], traced["tokenizer"])
            st.plotly_chart(top_bars(values, [f"{readable(t)}  (id {i})" for t, i in labels], "Top-10 scores (logits) for the next "
                                     "token — untrained", "logit"), key="trace_logits", width="stretch")
        code_behind(*stage.CODE["trace"])
    except GlassBoxError as e:
        show_error(e)

st.header("3. Let it talk")
st.write("Untrained, the model picks tokens almost at random — that gibberish is the starting point "
         "of stage 4. A trained run shows what learning bought.")
source = st.radio("Model", ["The untrained model above", "A run on disk"], horizontal=True, key="gen_source")
talker = None
try:
    if source == "A run on disk":
        run_id = run_picker(stage.LANGUAGE_MODEL_STAGES, "Run", key="gen_run", require_weights=True)
        if run_id is None:
            st.info("No run with a language model yet: pre-train one on stage 4, or import GPT-2 below.")
        else:
            talker = stage.run_model(run_id)
    elif config is not None and report["parameters"] <= stage.BUILD_LIMIT:
        talker = stage.untrained_model(config)
    elif config is not None:
        st.info("This shape is too big to build in the app: choose a smaller one, or a run on disk.")
except GlassBoxError as e:
    show_error(e)

if talker is not None:
    model, tokenizer = talker
    prompt = st.text_area("Prompt", "Once upon a time", key="gen_prompt", max_chars=2000)
    c1, c2, c3, c4, c5 = st.columns(5)
    max_new = c1.slider("New tokens", 1, 200, 40, key="gen_max_new")
    temperature = c2.slider("Temperature (0 = greedy)", 0.0, 2.0, 1.0, 0.05, key="gen_temperature")
    top_k = c3.number_input("Top-k (0 = off)", 0, 100_000, 0, key="gen_top_k")
    top_p = c4.slider("Top-p (1 = off)", 0.05, 1.0, 1.0, 0.05, key="gen_top_p")
    seed = c5.number_input("Seed", 0, 2**31 - 1, 0, key="gen_seed")
    filters = dict(temperature=temperature, top_k=int(top_k) or None, top_p=top_p if top_p < 1.0 else None)
    try:
        probs = stage.next_token(model, tokenizer, prompt, **filters)
        values, labels = stage.top_tokens(probs, tokenizer)
        st.plotly_chart(top_bars(values, [f"{readable(t)}  (id {i})" for t, i in labels], "Where the next token is drawn from "
                                 "(after the filters)", "probability"), key="gen_next", width="stretch")
        code_behind(*stage.CODE["sampling"])
        if st.button("Generate", type="primary", key="gen_go"):
            with st.spinner("Generating…"):
                st.session_state["gen_output"] = (prompt, *stage.generate_text(model, tokenizer, prompt, max_new,
                                                                             seed, **filters))
        if "gen_output" in st.session_state:
            shown_prompt, continuation, n_new = st.session_state["gen_output"]
            st.caption(f"{n_new} new tokens after the prompt:")
            st.text(shown_prompt + continuation)  # st.text shows model output as plain text, never HTML
            code_behind(*stage.CODE["generate"])
    except GlassBoxError as e:
        show_error(e)
if source == "A run on disk" and talker is not None:
    microscope_panel(run_id, key="p3_scope", default_prompt="To be, or not")

st.header("4. Two models side by side")
st.write("What each idea costs: the modern preset keeps base's shape but rotates positions (no position "
         "table), shares each key/value head between two query heads (half the KV cache) and gates its "
         "feed-forward. Pick any two presets or runs.")
choices = stage.comparable()
a, b = st.columns(2)
first = a.selectbox("First", choices, index=choices.index("base"), key="cmp_first")
second = b.selectbox("Second", choices, index=choices.index("modern"), key="cmp_second")
try:
    rows = stage.compare(first, second)
    st.table(pd.DataFrame(rows).set_index("figure").map(lambda v: f"{v:,}" if isinstance(v, int) else v))
    st.plotly_chart(compare_bars(rows, [first, second]), key="cmp_bars", width="stretch")
    code_behind(*stage.CODE["compare"])
except GlassBoxError as e:
    show_error(e)

st.header("5. Bring in GPT-2's weights")
st.write("Our GPT is GPT-2's architecture, so OpenAI's weights drop straight in. Point at a folder "
         "with `config.json` and `model.safetensors` (what Hugging Face's `save_pretrained` writes).")
folder = st.text_input("Folder", key="import_folder", placeholder="/path/to/gpt2")
download = st.checkbox("Download openai-community/gpt2 from the Hugging Face hub first (online, ~550 MB)",
                       key="import_download")
import_id = st.text_input("Run id for the imported model", "gpt2-124m", key="import_run_id")
if st.button("Import", key="import_go"):
    try:
        source_folder = folder.strip()
        if download:
            bar = st.progress(0.0, text="Downloading…")
            source_folder = importer.download_gpt2(progress=lambda done, total, name: bar.progress(
                min(done / total, 1.0) if total else 0.0, text=f"{name}: {done / 2**20:,.0f} MiB"))
        if not source_folder:
            raise GlassBoxError("Type the folder that holds config.json and model.safetensors.")
        with st.spinner("Importing…"):
            result = importer.import_from_app(source_folder, import_id.strip(), owner())
        st.success(f"Imported {result['parameters']:,} parameters as run '{result['run_id']}'. "
                   "Pick it under 'A run on disk' above.")
    except GlassBoxError as e:
        show_error(e)

quantization_panel(key="p3_quant")
