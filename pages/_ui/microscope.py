"""The microscope panel: watch a model on disk decide, token by token and layer by layer.

Pages 3, 4 and 6 embed it with one call:

    from pages._ui.microscope import microscope_panel
    microscope_panel(run_id, key="p3_scope", default_prompt="To be, or not")

Three tabs, each computed by one stage function (core.stages.generate / surprise / lens) and shown
beside its textbook code:
1. Next token, step by step: three distributions per step, clickable candidates (a branch), back,
   and the KV cache made visible.
2. Surprise: the text coloured by the model's loss on each token; hover for the alternatives.
3. Logit lens: layer x position grid of the top guess, beside one head's attention.

Clickable candidates have stable keys for browser tests: `{key}_cand_{i}` (i = 0 is the model's
favourite), and the buttons `{key}_next`, `{key}_more`, `{key}_back`, `{key}_reset`, `{key}_time`.
"""

from __future__ import annotations

import html
import math

import plotly.graph_objects as go
import streamlit as st

from core.gpt.errors import GlassBoxError
from core.lab import models, runs
from core.stages import generate, lens, surprise
from pages._ui import show_error
from pages._ui.code import code_behind
from pages._ui.tokens import readable_token, spans_of, token_spans_html

CANDIDATES = 10  # candidates drawn (and clickable) per step
PREVIEW = 8  # tokens shown after the current step: what would follow
COLOURS = {"p_raw": "#9ca3af", "p_temperature": "#60a5fa", "p_kept": "#f97316"}
NAMES = {"p_raw": "raw softmax", "p_temperature": "after temperature", "p_kept": "kept (top-k / top-p)"}
DEFAULT_TEXT = "To be, or not to be, that is the question."


# ---------------------------------------------------------------------------- loading


@st.cache_resource(max_entries=2, show_spinner="Loading the model…")
def _subject(run_id: str, stamp: float) -> generate.Subject:
    return generate.open_subject(run_id)


def _stamp(run_id: str) -> float:
    weights = runs.open_run(run_id).file("model.safetensors")
    return weights.stat().st_mtime if weights.is_file() else 0.0


def load_subject(run_id: str) -> generate.Subject:
    """The run's model, loaded once per version of its weights."""
    return _subject(run_id, _stamp(run_id))


VIEWS = {"generate": (generate.explore, generate.Settings), "surprise": (surprise.score, surprise.Settings),
         "lens": (lens.read, lens.Settings)}


@st.cache_data(max_entries=64, show_spinner=False)
def _view(view: str, run_id: str, stamp: float, **fields) -> dict:
    compute, settings = VIEWS[view]
    return compute(_subject(run_id, stamp), settings(run=run_id, **fields))


def computed(view: str, run_id: str, **fields) -> dict:
    """A view's result, remembered: a click in one tab does not recompute the other two."""
    return _view(view, run_id, _stamp(run_id), **fields)


def label(subject: generate.Subject, token_id: int) -> str:
    if 0 <= token_id < subject.tokenizer.vocab_size:
        return readable_token(subject.tokenizer, token_id)
    return subject.label(token_id)


def chip(text: str, style: str, hover: str = "") -> str:
    """One token as an escaped, styled span (hover text in its title)."""
    return (f'<span title="{html.escape(hover, quote=True)}" style="{style};border-radius:3px;'
            f'padding:1px 3px;margin:1px;white-space:pre-wrap;font-family:monospace">'
            f'{html.escape(text)}</span>')


def chips(parts: list[str]) -> None:
    st.markdown('<div style="line-height:2.2">' + "".join(parts) + "</div>", unsafe_allow_html=True)


# ---------------------------------------------------------------------------- 1. the step generator


def _path(key: str, identity: tuple) -> list:
    """The tokens taken after the prompt, [(id, "clicked" | "sampled")]; reset when run or prompt change."""
    if st.session_state.get(f"{key}_path_for") != identity:
        st.session_state[f"{key}_path_for"] = identity
        st.session_state[f"{key}_path"] = []
    return st.session_state[f"{key}_path"]


def sampler_controls(key: str) -> dict:
    """Temperature, top-k, top-p and seed widgets (keys `{key}_temperature` ...), shared with the chat
    page: returns {"temperature", "top_k" (None = off), "top_p" (None = off), "seed"}."""
    c1, c2, c3, c4 = st.columns(4)
    temperature = c1.slider("Temperature", 0.0, 2.0, 1.0, 0.05, key=f"{key}_temperature",
                            help="0 means greedy: always the top token.")
    top_k = c2.number_input("top-k (empty = off)", min_value=0, value=None, step=1, key=f"{key}_top_k")
    top_p = c3.slider("top-p", 0.0, 1.0, 1.0, 0.01, key=f"{key}_top_p", help="1 keeps everything.")
    seed = c4.number_input("Seed", min_value=0, value=0, step=1, key=f"{key}_seed")
    st.caption("Temperature 0 is greedy decoding (always the top token); top-k must be at least 1 "
               "and top-p between 0 (exclusive) and 1.")
    return {"temperature": float(temperature), "top_k": None if top_k is None else int(top_k),
            "top_p": None if top_p >= 1.0 else float(top_p), "seed": int(seed)}


def _candidates_figure(subject, step: dict) -> go.Figure:
    tokens = [f"{i + 1}. {label(subject, c['id'])}" for i, c in enumerate(step["top"])]
    fig = go.Figure()
    for name in ("p_raw", "p_temperature", "p_kept"):
        fig.add_bar(y=tokens, x=[c[name] for c in step["top"]], name=NAMES[name], orientation="h",
                    marker_color=[COLOURS[name] if (name != "p_kept" or c["p_kept"] > 0) else "#e5e7eb"
                                  for c in step["top"]])
    fig.update_layout(barmode="group", height=80 + 34 * len(tokens), yaxis=dict(autorange="reversed"),
                      xaxis=dict(title="probability", range=[0, 1]), margin=dict(l=10, r=10, t=10, b=10),
                      legend=dict(orientation="h", y=-0.15))
    return fig


def _click(key: str, token_id: int) -> None:
    st.session_state[f"{key}_path"].append((int(token_id), "clicked"))


def _take(key: str, token_ids: list[int]) -> None:
    st.session_state[f"{key}_path"].extend((int(i), "sampled") for i in token_ids)


def _back(key: str) -> None:
    if st.session_state[f"{key}_path"]:
        st.session_state[f"{key}_path"].pop()


def _reset(key: str) -> None:
    st.session_state[f"{key}_path"] = []


def _text_so_far(subject, result: dict, path: list, current: dict | None, preview: list[dict]) -> None:
    parts = [chip(t, "background:#e5e7eb;color:#374151", "prompt") for t in
             (label(subject, i) for i in result["prompt_ids"][-200:])]
    for (token_id, how), step in zip(path, result["steps"]):
        style = "background:#fed7aa;color:#111;outline:2px solid #ea580c" if how == "clicked" else "background:#fde68a;color:#111"
        parts.append(chip(label(subject, token_id), style, f"{how}; rank {step['rank']}; "
                                                            f"entropy {step['entropy']:.2f} bits"))
    if current is not None:
        parts.append(chip("▮", "color:#ea580c", "the next token: pick one of the candidates"))
    parts += [chip(label(subject, s["token_id"]), "color:#9ca3af", "what would follow") for s in preview]
    chips(parts)
    st.caption("Grey: the prompt. Yellow: tokens taken (outlined: ones you clicked). ▮: the step below. "
               "Faded: what the sampler would write next.")


def generator_view(run_id: str, key: str, default_prompt: str = DEFAULT_TEXT, template: str | None = None) -> None:
    """Generation one token at a time with its three distributions and the KV cache."""
    prompt = st.text_area("Prompt", default_prompt, key=f"{key}_prompt", height=80)
    settings = sampler_controls(key)
    try:
        subject = load_subject(run_id)
        chosen = template or subject.template
        if chosen != "none":
            st.caption(f"This run's prompts go in the **{chosen}** template: the model sees it around your text.")
        path = _path(key, (run_id, prompt, chosen))
        result = computed("generate", run_id, prompt=prompt, max_new_tokens=len(path) + 1 + PREVIEW,
                          template=chosen, force=tuple(i for i, _ in path), show=CANDIDATES,
                          **{**settings, "seed": settings["seed"] + len(path)})
    except GlassBoxError as e:
        show_error(e)
        return
    if result["note"]:
        st.warning(result["note"])
    steps = result["steps"]
    current = steps[len(path)] if len(steps) > len(path) else None
    _text_so_far(subject, result, path, current, steps[len(path) + 1:])
    buttons = st.columns(4)
    buttons[0].button("Next token", key=f"{key}_next", on_click=_take, args=(key, [current["token_id"]] if current else []),
                      disabled=current is None, help="take the token the sampler drew")
    buttons[1].button(f"Next {PREVIEW}", key=f"{key}_more", on_click=_take,
                      args=(key, [s["token_id"] for s in steps[len(path):len(path) + PREVIEW]]),
                      disabled=current is None)
    buttons[2].button("◀ Back", key=f"{key}_back", on_click=_back, args=(key,), disabled=not path)
    buttons[3].button("Reset", key=f"{key}_reset", on_click=_reset, args=(key,), disabled=not path)
    if current is None:
        st.info("The model wrote its end-of-text token: the answer is over. Go back a step to branch.")
    else:
        _current_step(subject, current, key, settings)
    if path:
        with st.expander(f"The {len(path)} steps taken: rank and entropy of each"):
            st.dataframe([{"position": s["position"], "token": label(subject, s["token_id"]), "how": how,
                           "rank": s["rank"], "entropy (bits)": round(s["entropy"], 2)}
                          for (_, how), s in zip(path, steps)], hide_index=True)
    _kv_cache_view(subject, result, path, key)
    code_behind(*generate.CODE["distributions"], *generate.CODE["generate"])


def _current_step(subject, step: dict, key: str, settings: dict) -> None:
    m1, m2, m3 = st.columns(3)
    m1.metric("Entropy of the raw distribution", f"{step['entropy']:.2f} bits")
    m2.metric("Rank of the token the sampler drew", step["rank"])
    m3.metric("Tokens kept by top-k / top-p", f"{step['kept_size']:,}")
    st.plotly_chart(_candidates_figure(subject, step), key=f"{key}_bars", width="stretch")
    st.caption("Click a candidate to take it instead (a branch); ◀ Back undoes a step. "
               "Orange bars are the kept set the sampler draws from; greyed tokens were cut.")
    columns = st.columns(5)
    for i, c in enumerate(step["top"]):
        kept = "" if c["p_kept"] > 0 else " (cut)"
        columns[i % 5].button(f"{label(subject, c['id'])} {c['p_raw']:.1%}{kept}", key=f"{key}_cand_{i}",
                              on_click=_click, args=(key, c["id"]), width="stretch")


def _kv_cache_view(subject, result: dict, path: list, key: str) -> None:
    with st.expander("The KV cache: what the model remembers between steps"):
        cfg = subject.model.config
        kv_heads = getattr(cfg, "n_kv_head", None) or cfg.n_head
        per_token = 2 * cfg.n_layer * kv_heads * cfg.head_size * 4
        n_now = len(result["prompt_ids"]) + len(path)  # cached when the current step was computed
        if n_now >= subject.context_length:
            st.info(f"The text fills the context ({subject.context_length} tokens): the window now slides, "
                    "every position shifts, so the cache is dropped and each step recomputes the window.")
        if not path:
            st.write("This first step read the whole prompt at once (the prefill) and stored every "
                     "token's keys and values; from the next step on the model reads one token at a time.")
        st.write(f"Steady state: to choose the next token the model reads only the newest token; the keys "
                 f"and values of the {n_now - 1:,} tokens before it come from the cache: "
                 f"**{per_token * (n_now - 1) / 1024:,.1f} KiB**, {per_token:,} bytes per token = 2 (a key "
                 f"and a value) × {cfg.n_layer} layers × {kv_heads} key/value heads × {cfg.head_size} "
                 "numbers × 4 bytes (fp32).")
        ids = result["prompt_ids"] + [i for i, _ in path]
        cached = [chip(label(subject, i), "background:#bbf7d0;color:#111", "keys and values cached")
                  for i in ids[:-1][-300:]]
        chips(cached + [chip(label(subject, ids[-1]), "background:#fecaca;color:#111",
                             "newest: its key and value are computed at this step")])
        st.caption("Green: cached. Red: the newest token, computed now (and cached for the next step).")
        if st.button("Time a token with and without the cache", key=f"{key}_time"):
            try:
                timing = generate.kv_timing(subject, ids)
            except GlassBoxError as e:
                show_error(e)
                return
            t1, t2, t3 = st.columns(3)
            t1.metric("With the cache", f"{timing['with_cache_s'] * 1000:.1f} ms/token")
            t2.metric("Recomputing everything", f"{timing['without_cache_s'] * 1000:.1f} ms/token")
            t3.metric("Speed-up", f"{timing['speedup']:.1f}×")
        code_behind(*generate.CODE["kv_cache"])


# ---------------------------------------------------------------------------- 2. surprise


def loss_colour(loss: float, worst: float) -> str:
    """White for an expected token, deep red for one as surprising as a uniform guess (log V) or more."""
    x = max(0.0, min(1.0, loss / worst))
    return f"rgb(255,{int(255 - 190 * x)},{int(255 - 190 * x)})"


def surprise_view(run_id: str, key: str, default_text: str = DEFAULT_TEXT, instruction: str | None = None,
                  template: str | None = None) -> None:
    """The text coloured by the model's loss on each token (page 4 refreshes it at each evaluation)."""
    text = st.text_area("Text to score" if instruction is None else "Answer to score", default_text,
                        key=f"{key}_surprise_text", height=80)
    try:
        subject = load_subject(run_id)
        prompt, chosen = None, template or subject.template
        if instruction is not None or chosen != "none":
            prompt = st.text_input("Instruction (the answer is scored after it, in the run's template)",
                                   instruction or "Rewrite the sentence in the passive voice.",
                                   key=f"{key}_surprise_instruction")
        result = computed("surprise", run_id, text=text, prompt=prompt, template=chosen)
    except GlassBoxError as e:
        show_error(e)
        return
    if result["note"]:
        st.warning(result["note"])
    worst = math.log(subject.model.config.vocab_size)
    start = result["answer_start"]
    spans = spans_of(subject.tokenizer, result["ids"])
    for n, span in enumerate(spans):
        span["n"] = n  # the loss of token n is losses[n - 1]: token 0 has nothing before it

    def colour(span) -> str:
        return "#e5e7eb" if span["n"] < max(1, start) else loss_colour(result["losses"][span["n"] - 1], worst)

    def hover(span) -> str:
        if span["n"] == 0:
            return "the first token: nothing before it predicts it"
        alternatives = ", ".join(f"{a['token']!r} {a['p']:.0%}" for a in result["alternatives"][span["n"] - 1])
        return (f"p = {result['p_real'][span['n'] - 1]:.1%}, loss {result['losses'][span['n'] - 1]:.2f} nats"
                f"{' (prompt)' if span['n'] < start else ''}\nthe model expected: {alternatives}")

    st.markdown(token_spans_html(spans, title=hover, colour=colour), unsafe_allow_html=True)
    c1, c2 = st.columns(2)
    scored = result["losses"][max(0, start - 1):] if start else result["losses"]
    c1.metric("Mean loss per token" + (" (answer)" if start else ""),
              f"{sum(scored) / max(1, len(scored)):.3f} nats")
    c2.metric("forward's loss on the same ids", f"{result['forward_loss']:.3f} nats")
    st.caption(f"White: expected. Red: as surprised as a uniform guess over {subject.model.config.vocab_size:,} "
               "tokens (log V nats) or more. Hover a token for its probability and the model's top 5."
               + (" Grey: the prompt (the answer starts after it)." if start else ""))
    code_behind(*surprise.CODE["surprise"])


# ---------------------------------------------------------------------------- 3. logit lens


def lens_view(run_id: str, key: str, default_text: str = DEFAULT_TEXT) -> None:
    """The next-token guess of every layer, beside one attention head."""
    text = st.text_area("Text to read through the lens", default_text, key=f"{key}_lens_text", height=80)
    try:
        subject = load_subject(run_id)
        cfg = subject.model.config
        c1, c2 = st.columns(2)
        layer = c1.selectbox("Attention of block", range(cfg.n_layer), key=f"{key}_lens_layer")
        head = c2.selectbox("Head", range(cfg.n_head), key=f"{key}_lens_head")
        result = computed("lens", run_id, text=text, layer=int(layer), head=int(head))
    except GlassBoxError as e:
        show_error(e)
        return
    if result["note"]:
        st.warning(result["note"])
    n = len(result["tokens"])
    position = st.slider("Position", 0, n - 1, n - 1, key=f"{key}_lens_position") if n > 1 else 0
    ids = result["ids"]
    xs = [f"{t}·{label(subject, i)}" for t, i in enumerate(ids)]
    right = [[t + 1 < n and row[t] == ids[t + 1] for t in range(n)] for row in result["top_ids"]]
    cells = [[f"{'✓' if ok else ''}{label(subject, i)[:10]}" for i, ok in zip(row, oks)]
             for row, oks in zip(result["top_ids"], right)]
    grid = go.Figure(go.Heatmap(z=result["top_probs"], x=xs, y=result["layers"], text=cells,
                                texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
                                hovertemplate="%{y}, after %{x}: %{text} (p=%{z:.2f})<extra></extra>"))
    grid.add_vline(x=position, line_color="#ea580c")
    grid.update_layout(height=120 + 36 * len(result["layers"]), margin=dict(l=10, r=10, t=10, b=10),
                       xaxis=dict(type="category", tickangle=-45))
    attention = go.Figure(go.Heatmap(z=result["attention"], x=xs, y=xs, colorscale="Oranges", zmin=0, zmax=1,
                                     hovertemplate="%{y} looks at %{x}: %{z:.2f}<extra></extra>"))
    attention.add_hline(y=position, line_color="#2563eb")
    attention.update_layout(height=420, yaxis=dict(autorange="reversed", type="category"),
                            xaxis=dict(type="category", tickangle=-45), margin=dict(l=10, r=10, t=10, b=10))
    left, right_col = st.columns([3, 2])
    left.plotly_chart(grid, key=f"{key}_lens_grid", width="stretch")
    right_col.plotly_chart(attention, key=f"{key}_lens_attention", width="stretch")
    final = result["top_tokens"][-1][position]
    first = next((name for name, row in zip(result["layers"], result["top_tokens"]) if row[position] == final), None)
    st.caption(f"At position {position} the model's final guess is {final!r} (p = "
               f"{result['top_probs'][-1][position]:.0%}); it is first the top guess at **{first}**. "
               "✓ marks a guess that is the real next token. Right: where each token looks in block "
               f"{layer}, head {head}; the blue line is position {position}.")
    code_behind(*lens.CODE["lens"])


# ---------------------------------------------------------------------------- the panel


def _weights_pending(run_id: str) -> bool:
    """A language-model run still training towards its first saved weights (nothing to open yet)."""
    if not (runs.run_dir(run_id) / "config.json").is_file():
        return True  # a job still starting or queued
    try:
        run = runs.open_run(run_id)
    except GlassBoxError:
        return False  # the views below say what is wrong with it
    return run.stage in models.LANGUAGE_MODEL_STAGES and not models.is_language_model_run(run)


def microscope_panel(run_id: str | None, key: str, default_prompt: str = DEFAULT_TEXT,
                     template: str | None = None, default_text: str | None = None) -> None:
    """The three views of one run, in tabs. `template` overrides the run's own prompt template
    ("none", "alpaca", "chatml"); `default_text` seeds the surprise and lens views."""
    st.subheader("🔬 The microscope: watch the model decide")
    if not run_id:
        st.info("Choose a run that holds a language model to look inside it.")
        return
    if _weights_pending(run_id):
        st.info("The microscope opens this run once it has saved weights (at its first checkpoint).", icon="⏳")
        return
    step_tab, surprise_tab, lens_tab = st.tabs(["Next token, step by step", "Surprise (per-token loss)",
                                                "Logit lens"])
    with step_tab:
        generator_view(run_id, key, default_prompt, template)
    with surprise_tab:
        surprise_view(run_id, key, default_text or default_prompt, template=template)
    with lens_tab:
        lens_view(run_id, key, default_text or default_prompt)
