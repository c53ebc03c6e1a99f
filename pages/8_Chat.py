"""Stage 8 — Chat: talk to an instruction-tuned, DPO or imported model, and see what a chat is to it.

A conversation is one long prompt written in the model's chat template; the reply streams token
by token from the KV cache. The page shows that prompt (special tokens highlighted), the cache
and the speed, and cuts a long conversation to the context window with a note.
"""

import streamlit as st

from core.stages import chat as stage
from core.stages.chat import CODE, GlassBoxError
from pages._ui import no_remote_images, show_error
from pages._ui.code import code_behind
from pages._ui.microscope import sampler_controls
from pages._ui.tokens import spans_of, token_spans_html

SHOW_TOKENS = 1_500

st.title("💬 Stage 8: Chat with your model")
st.caption("A chat is text too: the conversation is written out in the model's template, and the "
           "model continues it until it writes its end-of-turn marker.")

run_ids = stage.chat_runs()
if not run_ids:
    st.info("No chat model yet: instruction-tune a run in stage 6, run DPO, or import SmolLM2 "
            "(`python -m core import --from smollm2-135m-instruct`).")
    code_behind(*CODE["alpaca"], *CODE["chatml"], title="The code behind a chat prompt (the two chat templates)")
    code_behind(*CODE["generation"], title="The code behind a streamed reply")
    st.stop()
run_id = st.selectbox("Model", run_ids, key="chat_run")


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def engine_for(run_id: str, stamp: float):
    return stage.open_engine(run_id)


try:
    engine = engine_for(run_id, stage.weights_stamp(run_id))
except GlassBoxError as error:
    show_error(error)
    st.stop()

with st.expander("Sampling: the same controls as the microscope", expanded=False):
    sampling = sampler_controls("chat")
    max_tokens = st.slider("Longest reply (tokens)", 8, min(512, engine.context_length // 2),
                           min(128, engine.context_length // 4), key="chat_max_tokens")

history = st.session_state.setdefault(f"chat_history_{run_id}", [])
partial = st.session_state.get("chat_partial")
if partial and not partial["done"] and partial["run"] == run_id:  # Stop (or a rerun) cut the reply
    history.append({"role": "assistant", "content": partial["text"], "stopped": True})
    partial["done"] = True

st.caption(f"Template: **{engine.template.name}** · context window {engine.context_length:,} tokens")
for message in history:
    with st.chat_message(message["role"]):
        st.markdown(no_remote_images(message["content"]) or "∅")
        if message.get("stopped"):
            st.caption("⏹ stopped")

question = st.chat_input("Ask the model…", key="chat_input")
if question:
    history.append({"role": "user", "content": question})
    with st.chat_message("user"):
        st.markdown(no_remote_images(question))
    conversation = [{"role": m["role"], "content": m["content"]} for m in history]
    try:
        view = stage.prompt_view(engine, conversation, max_tokens)
    except GlassBoxError as error:
        history.pop()
        show_error(error)
        st.stop()
    st.session_state["chat_view"] = view
    if view["dropped"]:
        st.info(f"✂️ The conversation no longer fits the {view['context_length']:,}-token context window: "
                f"the oldest {view['dropped']} message(s) were cut, and the model does not see them.")
    st.button("⏹ Stop", key="chat_stop", help="Ends the reply where it is.")  # a click reruns the page
    stats = {}
    partial = st.session_state["chat_partial"] = {"run": run_id, "text": "", "done": False}

    def pieces():
        for piece in stage.reply(engine, conversation, stats, temperature=sampling["temperature"],
                                 top_k=sampling["top_k"], top_p=sampling["top_p"], max_tokens=max_tokens,
                                 seed=sampling["seed"]):
            partial["text"] += piece
            yield piece

    with st.chat_message("assistant"):
        try:
            st.write_stream(pieces())
        except GlassBoxError as error:  # e.g. top-k 0: the question is taken back, unanswered
            show_error(error)
            history.pop()
            stats = None
    partial["done"] = True
    if stats is not None:
        history.append({"role": "assistant", "content": partial["text"]})
        st.session_state["chat_stats"] = stats

view, stats = st.session_state.get("chat_view"), st.session_state.get("chat_stats")
left, right = st.columns([3, 2])
with left:
    if st.toggle("Show the prompt the model read", key="chat_show_prompt") and view:
        st.code(view["text"], language=None, wrap_lines=True)
        specials = engine.tokenizer.special_ids()
        st.caption(f"{len(view['ids']):,} tokens; special tokens are dark, one id each "
                   f"({', '.join(sorted(engine.tokenizer.token_text(i) for i in specials)[:6])})")
        shown = view["ids"][-SHOW_TOKENS:]  # every token is a coloured label: a long prompt is many MB of HTML
        if len(shown) < len(view["ids"]):
            st.caption(f"Drawing the last {SHOW_TOKENS:,} of {len(view['ids']):,} tokens.")
        st.markdown(token_spans_html(spans_of(engine.tokenizer, shown), show_ids=True), unsafe_allow_html=True)
with right:
    if stats:
        st.metric("KV cache", f"{stats.get('kv_cache_tokens', 0):,} / {engine.context_length:,} tokens")
        st.metric("KV cache memory", f"{stats.get('kv_cache_bytes', 0) / 1024:,.1f} KiB")
        st.metric("Speed", f"{stats['tokens_per_s'] or 0:,.1f} tokens/s",
                  help=f"time to first token {stats['time_to_first_token_s'] or 0:.3f} s")
        st.caption(f"{stats['completion_tokens']} tokens · ended by: {stats['finish_reason']}")
        if view and view["dropped"]:
            st.caption(f"✂️ The model did not see the oldest {view['dropped']} message(s): they no longer fit.")
        if view and st.button("Measure with and without the KV cache", key="chat_measure"):
            speed = stage.speed_with_and_without_cache(engine, view["ids"])
            st.write(f"With the cache **{speed['with_cache']:,.1f}** tokens/s; without it (every step "
                     f"reads the whole prompt again) **{speed['without_cache']:,.1f}** tokens/s.")
if history and st.button("Start a new conversation", key="chat_clear"):
    history.clear()
    st.session_state.pop("chat_view", None)
    st.session_state.pop("chat_stats", None)
    st.rerun()

code_behind(*CODE[engine.template.name], title="The code behind this prompt (the chat template)")
code_behind(*CODE["context"], title="The code behind the cut to the context window")
code_behind(*CODE["generation"], title="The code behind the streamed reply")
