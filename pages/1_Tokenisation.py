"""Stage 1 — Text and tokens: how text becomes the integers a model reads, and comes back.

Pick a corpus, train a byte-pair encoder on it, compare four tokenisers on typed text, check the
round trip, see the (input → target) pairs a model learns from, and save the tokeniser as a run.
The lesson is core/gpt/tokenizers.py; this page calls core/stages/tokenize.py and draws.
"""

import hashlib
import threading

import pandas as pd
import streamlit as st

from core.stages import tokenize
from core.stages.tokenize import CODE, GlassBoxError
from pages._ui import owner, page_header, run_name_input, show_error, show_everyone
from pages._ui.charts import curves_figure
from pages._ui.code import code_behind
from pages._ui.tokens import readable_token, spans_of, token_spans_html

KIND_NAMES = {"char": "Characters", "word": "Words", "bpe": "Our BPE", "gpt2": "GPT-2 (tiktoken)"}
TRAIN_LIMIT = 3_000_000  # characters used to train on the page, so a big upload stays quick
TEXT_LIMIT = 5_000  # typed text drawn as coloured spans: 100k characters made 20 MB of HTML per rerun
DEFAULT_TEXT = "Hello, world! Tokenisers turn text into numbers: naïve café, 東京, 🙂 and  spaces."


@st.cache_resource(show_spinner=False)
def _bpe_store() -> tuple[dict, threading.Lock]:
    return {}, threading.Lock()  # (corpus, text fingerprint, vocab size) -> trained BPE, for all sessions


def trained_bpe(corpus: str, text: str, vocab_size: int, progress=None):
    """Train once per corpus and size (not st.cache_resource: its progress bar must not be replayed).
    One at a time: a class opening this page at once trained 20 copies side by side (load test)."""
    store, lock = _bpe_store()
    key = (corpus, len(text), hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest(), vocab_size)
    with lock:
        if key not in store:
            if len(store) >= 8:
                store.pop(next(iter(store)))  # forget the oldest
            store[key] = tokenize.train("bpe", text, vocab_size, progress=progress)
        return store[key]


@st.cache_resource(show_spinner=False, max_entries=8)
def trained_other(corpus: str, text: str, kind: str):
    return tokenize.train(kind, text, None)


@st.cache_data(show_spinner=False, max_entries=8)
def compression(corpus: str, text: str, vocab_size: int) -> list[dict]:
    sizes = sorted({257, *range(300, vocab_size, max(50, (vocab_size - 257) // 12)), vocab_size})
    return tokenize.compression_curve(trained_bpe(corpus, text, vocab_size), text[:50_000], sizes)


page_header(1, "A model never sees letters, only integers. Here text becomes a list of token ids "
               "and comes back again.")

st.header("1. Choose a corpus")
sources = tokenize.text_sources(owner(), show_everyone())
corpus = st.selectbox("Corpus", sources, index=sources.index("python-docs") if "python-docs" in sources else 0)
upload = st.file_uploader("…or upload your own text file (UTF-8)", type=["txt", "md", "csv", "text"])
if upload is not None:
    try:
        saved = st.session_state.get("tok-upload")  # (file id, source name): store each upload once
        if not saved or saved[0] != upload.file_id:
            saved = (upload.file_id, tokenize.save_upload(upload.name, upload.getvalue(), owner()))
            st.session_state["tok-upload"] = saved
        corpus = saved[1]
        st.success(f"Using your upload as the corpus: {corpus}")
    except GlassBoxError as error:
        show_error(error)
try:
    corpus_text = tokenize.read_text(corpus)
except GlassBoxError as error:
    show_error(error)
    st.stop()

stats = tokenize.corpus_stats(corpus_text)
for column, (label, value) in zip(st.columns(len(stats)), stats.items()):
    column.metric(label.capitalize(), f"{value:,}")
with st.expander("Preview the first lines"):
    st.text(corpus_text[:1200])
train_text = corpus_text[:TRAIN_LIMIT]
if len(corpus_text) > TRAIN_LIMIT:
    st.caption(f"The tokenisers on this page learn from the first {TRAIN_LIMIT:,} characters.")

st.header("2. Train a byte-pair encoder")
st.write("Byte-level BPE starts from the 256 possible bytes and, again and again, glues the most "
         "frequent neighbouring pair into a new token. Every merge makes the text shorter.")
vocab_size = st.slider("Vocabulary size", min_value=tokenize.MIN_BPE_VOCAB, max_value=4096, value=1000, step=1)
bar = st.progress(0.0, text="Training…")
try:
    bpe = trained_bpe(corpus, train_text, vocab_size, progress=lambda done, total: bar.progress(
        done / max(total, 1), text=f"Merges learnt: {done:,}/{total:,}"))
    tokenizers = {"char": trained_other(corpus, train_text, "char"), "word": trained_other(corpus, train_text, "word"),
                  "bpe": bpe, "gpt2": trained_other("", "", "gpt2")}
except GlassBoxError as error:
    show_error(error)
    st.stop()
bar.progress(1.0, text=f"Trained: {bpe.vocab_size:,} tokens ({len(bpe.merges):,} merges).")

merges_col, chart_col = st.columns(2)
with merges_col:
    st.subheader("The first merges")
    st.dataframe(pd.DataFrame(tokenize.merges_table(bpe, 20)), hide_index=True)
    code_behind(*CODE["merges"], title="The code behind these merges (the whole algorithm)")
    code_behind(*CODE["fast"], title="The same merges, fast (what trained this vocabulary)")
with chart_col:
    st.subheader("Bigger vocabulary, shorter text")
    st.plotly_chart(curves_figure([("our BPE", compression(corpus, train_text, vocab_size), "chars_per_token")],
                                  x_key="vocab_size", y_title="characters per token"), width="stretch")
    code_behind(*CODE["compression"])

st.header("3. Four tokenisers side by side")
text = st.text_area(f"Type some text (at most {TEXT_LIMIT:,} characters)", DEFAULT_TEXT, height=90,
                    max_chars=TEXT_LIMIT)
if len(text) >= TEXT_LIMIT:  # Streamlit cuts longer text to max_chars; say so, never silently
    st.warning(f"This box keeps only the first {TEXT_LIMIT:,} characters: every token below becomes a "
               "coloured label, and a longer text makes the page slow.")
    text = text[:TEXT_LIMIT]
summary = []
for row in (tokenize.KINDS[:2], tokenize.KINDS[2:]):
    for column, kind in zip(st.columns(2), row):
        tokenizer = tokenizers[kind]
        ids = tokenizer.encode(text)
        check = tokenize.round_trip(tokenizer, text)
        per_token = tokenize.chars_per_token(text, ids)
        summary.append({"tokeniser": KIND_NAMES[kind], "vocabulary": tokenizer.vocab_size, "tokens": len(ids),
                        "chars per token": round(per_token, 2),
                        "round trip": "✓" if check["ok"] else f"✗ differs at character {check['first_difference']}"})
        with column:
            st.markdown(f"**{KIND_NAMES[kind]}** · {len(ids)} tokens · {per_token:.2f} chars/token")
            st.markdown(token_spans_html(spans_of(tokenizer, ids)), unsafe_allow_html=True)
            st.caption("ids: " + ", ".join(map(str, ids[:200])) + (" …" if len(ids) > 200 else ""))
st.dataframe(pd.DataFrame(summary), hide_index=True)
code_behind(*CODE["encode"], title="The code behind our BPE's tokens")

st.header("4. The round trip")
st.write("decode(encode(text)) should give the text back. Characters and words the tokeniser never "
         "saw become `<|unk|>` and are lost; byte-level tokenisers can spell anything.")
kind = st.radio("Tokeniser", tokenize.KINDS, format_func=KIND_NAMES.get, horizontal=True, index=2)
check = tokenize.round_trip(tokenizers[kind], text)
left, right = st.columns(2)
left.caption("Your text")
left.code(text, language=None, wrap_lines=True)
right.caption("decode(encode(text))")
right.code(check["decoded"], language=None, wrap_lines=True)
if check["ok"]:
    st.success("✓ The text came back exactly.")
else:
    at = check["first_difference"]
    st.warning(f"✗ First difference at character {at}: {text[at:at + 12]!r} came back as "
               f"{check['decoded'][at:at + 12]!r}.")
code_behind(*CODE["round_trip"])

st.header("5. Inputs and targets")
st.write("A model learns to predict the next token. Slide a window over the ids; the target is the "
         "window shifted by one, so each position is a small question: what comes next?")
source = st.radio("Take the ids from", ["the text above", "the corpus"], horizontal=True)
context_length = st.slider("Context length", 2, 16, 8)
ids = tokenizers[kind].encode(text if source == "the text above" else corpus_text[:20_000])
start = st.number_input("Window starts at token", min_value=0, max_value=max(0, len(ids) - context_length - 1), value=0)
try:
    pairs = tokenize.next_token_pairs(ids, int(start), context_length)
except GlassBoxError as error:
    show_error(error)
else:
    show = lambda i: readable_token(tokenizers[kind], i)  # noqa: E731
    st.dataframe(pd.DataFrame([{"input (tokens)": " | ".join(show(i) for i in context), "→ target": show(target),
                                "input ids": str(context), "target id": target} for context, target in pairs]),
                 hide_index=True)
code_behind(*CODE["pairs"])

st.header("6. Save the tokeniser")
st.write("Later stages name a saved tokeniser by its run id (e.g. `--tokenizer <run id>`).")
save_kind = st.radio("Which tokeniser", ["bpe", "char", "word"], format_func=KIND_NAMES.get, horizontal=True)
run_id = run_name_input(st, "tokenizer", key="tok-run-id", label="Run id")
if st.button("Save tokeniser", type="primary"):
    try:
        tokenize.run(tokenize.Settings(data=corpus, tokenizer=save_kind, run_id=run_id,
                                       vocab_size=vocab_size if save_kind == "bpe" else None),
                     trained=tokenizers[save_kind], owner=owner())
    except GlassBoxError as error:
        show_error(error)
    else:
        st.success(f"Saved {KIND_NAMES[save_kind]} as run {run_id}: use it later as `--tokenizer {run_id}`.")
