"""Stage 3 — The GPT architecture: size a model, follow a token through it, let it talk.

1. Choose the shape (sliders or a preset): the parameter count, its memory and where the
   parameters live update as you move a slider.
2. Follow a short input through the model: every module's output shape, then the scores of
   the next token.
3. Generate text from the untrained model (gibberish, on purpose) or from any run on disk, with
   temperature, top-k and top-p, and see the distribution the next token is drawn from.
4. Bring in OpenAI's GPT-2 weights from a folder (or the hub, when online).

Everything computed here comes from core/model.py and core/gpt2.py; this page only draws it.
"""

import html
import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from core.lab import runs
from core.gpt.errors import GlassBoxError
from core.gpt.model import GPT, GPTConfig, PRESETS, count_parameters, memory_bytes
from pages._ui import page_header, run_picker, show_error

FONT = 18
BUILD_LIMIT = 30_000_000  # above this, the page shows shapes only (no weights in the app's memory)
MODEL_STAGES = ("pretrain", "instruct", "import")  # runs whose output layer is a language model
PRESET_VOCAB = {"tiny": 65, "small": 65, "base": 1000}  # typical tokenizers: characters, our BPE
EMBD_OPTIONS = [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1600]
CONTEXT_OPTIONS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
COMPONENT_COLOURS = {"token embedding": "#4C78A8", "position embedding": "#9ECAE9", "attention": "#F58518",
                     "feed-forward": "#54A24B", "layer norms": "#B279A2", "output head": "#E45756"}

page_header(3, "A GPT is a stack of identical blocks between an embedding and an output head. "
               "Size one, follow a token through it, and hear what an untrained model says.")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024


def readable(token: str) -> str:
    """Spaces and line breaks made visible; escaped, because plotly renders a little HTML."""
    shown = token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")
    return html.escape(shown if shown else "∅", quote=False)  # plotly shows &quot; literally


# ------------------------------------------------------------------------------ 1. the shape

DEFAULTS = {"vocab_size": 65, **{k: v for k, v in PRESETS["tiny"].items() if k != "dropout"},
            "qkv_bias": False, "tie_weights": True}
for name, value in DEFAULTS.items():
    st.session_state.setdefault(f"cfg_{name}", value)


def use_preset(name: str) -> None:
    """Button callback: copy a preset into the sliders (before they are drawn)."""
    preset = PRESETS[name]
    st.session_state["cfg_vocab_size"] = preset.get("vocab_size", PRESET_VOCAB.get(name, 1000))
    for key in ("context_length", "n_embd", "n_head", "n_layer"):
        st.session_state[f"cfg_{key}"] = preset[key]
    st.session_state["cfg_qkv_bias"] = preset.get("qkv_bias", False)
    st.session_state["cfg_tie_weights"] = preset.get("tie_weights", True)


st.header("1. Choose the shape")
st.write("A preset, or your own numbers. Every count below is arithmetic on these numbers: "
         "nothing is built until you ask for a trace or a sample.")
columns = st.columns(len(PRESETS))
for column, name in zip(columns, PRESETS):
    column.button(name, key=f"preset_{name}", on_click=use_preset, args=(name,), width="stretch")

left, right = st.columns(2)
with left:
    st.number_input("Vocabulary size (from the tokenizer)", min_value=1, max_value=300_000, step=1,
                    key="cfg_vocab_size")
    st.select_slider("Context length (positions the model can see)", CONTEXT_OPTIONS, key="cfg_context_length")
    st.select_slider("Embedding size n_embd (numbers per token)", EMBD_OPTIONS, key="cfg_n_embd")
with right:
    st.slider("Attention heads n_head", 1, 32, key="cfg_n_head")
    st.slider("Transformer blocks n_layer", 1, 48, key="cfg_n_layer")
    st.checkbox("Bias on Q, K, V (GPT-2 has one)", key="cfg_qkv_bias")
    st.checkbox("Tie the output head to the token embedding", key="cfg_tie_weights")

config = None
try:
    config = GPTConfig(**{name: st.session_state[f"cfg_{name}"] for name in DEFAULTS})
except GlassBoxError as e:
    show_error(e)

if config is not None:
    parts = count_parameters(config)
    total = sum(parts.values())
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Parameters", f"{total:,}")
    m2.metric("Weights in fp32", human_bytes(memory_bytes(total)))
    # Training holds the weights, their gradients and AdamW's two running averages: 4 copies.
    m3.metric("Training memory (weights + grads + AdamW)", human_bytes(memory_bytes(total) * 4))
    m4.metric("Head size (n_embd / n_head)", config.head_size)
    fig = go.Figure()
    for part, count in parts.items():
        fig.add_trace(go.Bar(x=[count], y=["parameters"], name=part, orientation="h",
                             marker_color=COMPONENT_COLOURS[part],
                             hovertemplate=f"{part}: %{{x:,}} ({100 * count / total:.1f}%)<extra></extra>"))
    fig.update_layout(barmode="stack", height=190, margin=dict(l=10, r=10, t=30, b=10), font_size=FONT - 4,
                      title="Where the parameters live", legend=dict(orientation="h", y=-0.4))
    st.plotly_chart(fig, key="param_bar", width="stretch")
    if config.tie_weights:
        st.caption("Tied: the output head reuses the token-embedding matrix, so it adds no parameters.")

# ------------------------------------------------------------------------------ 2. the trace


class ByteIds:
    """Token ids for a model without a tokenizer: the text's UTF-8 bytes (folded into the vocabulary)."""

    kind = "bytes"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def token_text(self, token_id: int) -> str:
        return chr(token_id) if 32 <= token_id < 127 else f"#{token_id}"

    def decode(self, ids) -> str:
        return "".join(self.token_text(int(i)) for i in ids)


@st.cache_resource(max_entries=2, show_spinner="Building the untrained model…")
def untrained_model(config_json: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_dict(json.loads(config_json))).eval()


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def run_model(run_id: str, stamp: float):
    """A run's model and tokenizer; `stamp` (the weights file's time) reloads a retrained run."""
    from core.lab.models import load_model_run

    model, tokenizer, _ = load_model_run(run_id)
    return model.eval(), tokenizer


def trace_table(trace: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{
        "module": "\u2003" * row["depth"] + row["module"],
        "what it is": row["kind"],
        "output shape": " × ".join(str(d) for d in row["output_shape"] or []),
        "parameters": row["parameters"],
        "fp32 memory": human_bytes(row["bytes_fp32"]),
        "note": row.get("note", ""),
    } for row in trace])


def logits_chart(probs_or_logits, tokenizer, title: str, key: str, axis: str) -> None:
    values, order = torch.topk(probs_or_logits, min(10, probs_or_logits.numel()))
    labels = [f"{readable(tokenizer.token_text(int(i)))}  (id {int(i)})" for i in order]
    fig = go.Figure(go.Bar(x=values.tolist()[::-1], y=labels[::-1], orientation="h", marker_color="#4C78A8"))
    fig.update_layout(title=title, height=380, margin=dict(l=10, r=10, t=40, b=10), font_size=FONT - 4,
                      xaxis_title=axis)
    st.plotly_chart(fig, key=key, width="stretch")


st.header("2. Follow one input through the model")
st.write("Each row is a module in the order the data visits it; the last dimension is what the "
         "module produces per token. Blocks repeat: only the numbers inside them differ.")
trace_text = st.text_input("A short input", "To be, or not", key="trace_text", max_chars=200)
if config is not None:
    tokenizer = ByteIds(config.vocab_size)
    ids = tokenizer.encode(trace_text)[-config.context_length:] or [0]
    try:
        if total > BUILD_LIMIT:
            from core.stages.inspect import inspect_model

            st.info(f"{total:,} parameters is too many to build inside the app: the shapes below come "
                    "from an empty ('meta') model, so there are no scores to show.")
            trace = inspect_model(config, ids=ids)["trace"]
            model = None
        else:
            model = untrained_model(json.dumps(config.to_dict(), sort_keys=True))
            trace = model.forward_trace(torch.tensor([ids]))
        st.caption(f"Input: {len(ids)} token ids (the UTF-8 bytes of the text — no tokenizer yet): "
                   f"{html.escape(str(ids[:24]))}{' …' if len(ids) > 24 else ''}")
        st.dataframe(trace_table(trace), hide_index=True, width="stretch", key="trace_table",
                     height=min(36 * (len(trace) + 1), 640))
        st.caption("GELU, in each block's feed-forward, is x·Φ(x) (Φ: the normal distribution's CDF). "
                   "Models trained here compute it exactly; GPT-2 was trained with a tanh approximation "
                   "and its imported weights keep that (the two differ by under 0.001). On a CPU the "
                   "exact one is about 3× faster.")
        if model is not None:
            with torch.no_grad():
                logits, _ = model(torch.tensor([ids]))
            logits_chart(logits[0, -1], tokenizer, "Top-10 scores (logits) for the next token — untrained",
                         key="trace_logits", axis="logit")
    except GlassBoxError as e:
        show_error(e)

# ------------------------------------------------------------------------------ 3. generate

st.header("3. Let it talk")
st.write("Untrained, the model picks tokens almost at random — that gibberish is the starting point "
         "of stage 4. A trained run shows what learning bought.")
source = st.radio("Model", ["The untrained model above", "A run on disk"], horizontal=True, key="gen_source")
gen_model, gen_tokenizer = None, None
try:
    if source == "A run on disk":
        run_id = run_picker(MODEL_STAGES, "Run", key="gen_run", require_weights=True)
        if run_id is None:
            st.info("No run with a language model yet: pre-train one on stage 4, or import GPT-2 below.")
        else:
            stamp = (runs.run_dir(run_id) / "model.safetensors").stat().st_mtime
            gen_model, gen_tokenizer = run_model(run_id, stamp)
    elif config is not None and total <= BUILD_LIMIT:
        gen_model = untrained_model(json.dumps(config.to_dict(), sort_keys=True))
        gen_tokenizer = ByteIds(config.vocab_size)
    elif config is not None:
        st.info("This shape is too big to build in the app: choose a smaller one, or a run on disk.")
except GlassBoxError as e:
    show_error(e)

if gen_model is not None:
    prompt = st.text_area("Prompt", "Once upon a time", key="gen_prompt", max_chars=2000)
    c1, c2, c3, c4, c5 = st.columns(5)
    max_new = c1.slider("New tokens", 1, 200, 40, key="gen_max_new")
    temperature = c2.slider("Temperature (0 = greedy)", 0.0, 2.0, 1.0, 0.05, key="gen_temperature")
    top_k = c3.number_input("Top-k (0 = off)", 0, 100_000, 0, key="gen_top_k")
    top_p = c4.slider("Top-p (1 = off)", 0.05, 1.0, 1.0, 0.05, key="gen_top_p")
    seed = c5.number_input("Seed", 0, 2**31 - 1, 0, key="gen_seed")
    filters = dict(temperature=temperature, top_k=int(top_k) or None, top_p=top_p if top_p < 1.0 else None)
    try:
        ids = gen_tokenizer.encode(prompt)
        if not ids:
            raise GlassBoxError("The prompt is empty: type a few characters.")
        prompt_ids = torch.tensor([ids[-gen_model.config.context_length:]])
        probs = gen_model.next_token_distribution(prompt_ids, **filters)
        logits_chart(probs, gen_tokenizer, "Where the next token is drawn from (after the filters)",
                     key="gen_next", axis="probability")
        if st.button("Generate", type="primary", key="gen_go"):
            generator = torch.Generator().manual_seed(int(seed))
            eos = getattr(gen_tokenizer, "eot_id", None)
            with st.spinner("Generating…"):
                out = gen_model.generate(torch.tensor([ids]), max_new, eos_id=eos, generator=generator, **filters)
            new_ids = out[0, len(ids):].tolist()
            st.session_state["gen_output"] = (prompt, gen_tokenizer.decode(new_ids), len(new_ids))
        if "gen_output" in st.session_state:
            shown_prompt, continuation, n_new = st.session_state["gen_output"]
            st.caption(f"{n_new} new tokens after the prompt:")
            st.text(shown_prompt + continuation)  # st.text shows model output as plain text, never HTML
    except GlassBoxError as e:
        show_error(e)

# ------------------------------------------------------------------------------ 4. GPT-2 weights

st.header("4. Bring in GPT-2's weights")
st.write("Our GPT is GPT-2's architecture, so OpenAI's weights drop straight in. Point at a folder "
         "with `config.json` and `model.safetensors` (what Hugging Face's `save_pretrained` writes).")
folder = st.text_input("Folder", key="import_folder", placeholder="/path/to/gpt2")
download = st.checkbox("Download openai-community/gpt2 from the Hugging Face hub first (online, ~550 MB)",
                       key="import_download")
import_id = st.text_input("Run id for the imported model", "gpt2-124m", key="import_run_id")
if st.button("Import", key="import_go"):
    from core.lab.gpt2 import download_gpt2, import_gpt2

    try:
        source_folder = folder.strip()
        if download:
            bar = st.progress(0.0, text="Downloading…")
            source_folder = download_gpt2(
                progress=lambda done, total, name: bar.progress(min(done / total, 1.0) if total else 0.0,
                                                                text=f"{name}: {done / 2**20:,.0f} MiB"))
        if not source_folder:
            raise GlassBoxError("Type the folder that holds config.json and model.safetensors.")
        with st.spinner("Importing…"):
            result = import_gpt2(source_folder, import_id.strip())
        st.success(f"Imported {result['parameters']:,} parameters as run '{result['run_id']}'. "
                   "Pick it under 'A run on disk' above.")
    except GlassBoxError as e:
        show_error(e)
