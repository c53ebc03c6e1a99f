"""Stage 1 tokenisers: round trips, BPE training against a slow reference and against tiktoken,
GPT-2 offline, save/load, bad input, and the command line."""

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.gpt import tokenizers as tok
from core.lab import tokenizer_files as tf
from core.stages import tokenize
from pages._ui.tokens import token_spans_html
from core.gpt.errors import GlassBoxError, TokenizerError
from core.lab.errors import RunExistsError

REPO = Path(__file__).resolve().parent.parent
SHARED = Path((os.environ.get("GLASSBOX_DATA_DIR") or "").split(os.pathsep)[0]
              or Path(__file__).resolve().parent.parent.parent / "shared" / "data")

TRICKY = [
    "",
    "Hello, world",
    "naïve café — déjà vu",
    "東京は雨です。你好，世界！",
    "emoji 🙂👩‍👩‍👧‍👦🇫🇷 and 👍🏽",
    "   leading, trailing   \n\n\t\t  \r\n  ",
    "it's they're we'll I'd you've 12345 3.14159",
    "<script>alert('x')</script> & <img src=x onerror=alert(1)>",
    "a\u0000b\u200bc\ufeffd",
]


def verdict_text() -> str:
    path = SHARED / "the-verdict.txt"
    if not path.is_file():
        pytest.skip("the-verdict.txt not in the shared data folder")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def small_bpe() -> tok.BPETokenizer:
    return tok.train_bpe(verdict_text(), 600)


# ------------------------------------------------------------------------------ byte-level BPE


def naive_train_bpe(text: str, vocab_size: int) -> list[tuple[int, int]]:
    """The textbook algorithm: recount every pair after every merge (slow, obviously right)."""
    pieces = Counter(tok._GPT2_SPLIT.findall(text))
    words = {tuple(p.encode("utf-8")): c for p, c in pieces.items()}
    token_bytes = {i: bytes([i]) for i in range(256)}
    merges, banned = [], set()
    while len(merges) < vocab_size - 257:
        counts = Counter()
        for word, c in words.items():
            for pair in zip(word, word[1:]):
                if pair not in banned:
                    counts[pair] += c
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in token_bytes.values():
            banned.add(pair)
            continue
        new_id = 256 + len(merges)
        merges.append(pair)
        token_bytes[new_id] = merged
        words = {tuple(tok.merge_pair(list(w), pair, new_id)): c for w, c in words.items()}
    return merges


def test_incremental_training_learns_the_same_merges_as_recounting():
    text = verdict_text()[:6000]
    assert tok.train_bpe(text, 400).merges == naive_train_bpe(text, 400)


def test_bpe_first_merge_is_the_most_frequent_pair():
    bpe = tok.train_bpe("aaabdaaabac aaabdaaabac", 260)
    assert bpe.merges[0] == (ord("a"), ord("a"))
    assert bpe.token_text(256) == "aa"


def test_bpe_vocabulary_layout(small_bpe):
    assert small_bpe.vocab_size == 600
    assert len(small_bpe.merges) == 600 - 257
    assert small_bpe.eot_id == 599
    assert small_bpe.encode("<|endoftext|>") == [599]
    assert small_bpe.decode([599]) == "<|endoftext|>"
    assert small_bpe.token_text(ord("A")) == "A"
    # the tokens are all different byte strings
    assert len(set(small_bpe.token_bytes)) == len(small_bpe.token_bytes)


def test_bpe_compresses_its_training_text(small_bpe):
    text = verdict_text()
    ids = small_bpe.encode(text)
    assert len(ids) < len(text.encode("utf-8")) / 2  # at least 2 bytes per token
    assert small_bpe.decode(ids) == text


@pytest.mark.parametrize("text", TRICKY)
def test_byte_level_round_trip_examples(small_bpe, text):
    assert small_bpe.decode(small_bpe.encode(text)) == text
    gpt2 = tf.gpt2_tokenizer()
    assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.one_of(
    st.characters(exclude_categories=["Cs"]),  # any code point that has a UTF-8 form
    st.sampled_from(list("éèüñçÅ東京你好🙂👍🏽\u200d \t\n\r  ")),
)))
def test_byte_level_round_trip_any_utf8(small_bpe, text):
    assert small_bpe.decode(small_bpe.encode(text)) == text
    gpt2 = tf.gpt2_tokenizer()
    assert gpt2.decode(gpt2.encode(text)) == text


def test_our_bpe_encodes_exactly_like_tiktoken_with_the_same_merges(small_bpe):
    # Build tiktoken's encoder straight from our vocabulary (bytes -> rank) and GPT-2's pattern.
    ranks = {data: rank for rank, data in enumerate(small_bpe.token_bytes)}
    theirs = tiktoken.Encoding(name="ours-in-tiktoken", pat_str=tok.GPT2_SPLIT_PATTERN,
                               mergeable_ranks=ranks, special_tokens={"<|endoftext|>": small_bpe.eot_id})
    held_out = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")[:30_000]
    for text in [verdict_text(), held_out, *TRICKY]:
        assert small_bpe.encode(text) == theirs.encode(text, allowed_special="all")
    assert tf.ByteLevelBPE.from_bpe(small_bpe).encode(held_out) == small_bpe.encode(held_out)


def test_split_pattern_is_tiktokens_gpt2_pattern():
    from tiktoken_ext.openai_public import r50k_pat_str

    assert tok.GPT2_SPLIT_PATTERN == r50k_pat_str


def test_partial_utf8_tokens_are_shown_readably():
    gpt2 = tf.gpt2_tokenizer()
    ids = gpt2.encode("🙂")
    assert len(ids) > 1  # an emoji is several byte tokens in GPT-2
    shown = [gpt2.token_text(i) for i in ids]
    assert all("\\x" in s for s in shown)
    assert gpt2.decode(ids[:1]) == "\ufffd"  # half a character decodes to the replacement mark


def test_compression_grows_with_vocabulary(small_bpe):
    rows = tok.compression_curve(small_bpe, verdict_text()[:5000], [257, 300, 400, 600, 10_000])
    assert [r["vocab_size"] for r in rows] == [257, 300, 400, 600]
    ratios = [r["chars_per_token"] for r in rows]
    assert ratios == sorted(ratios) and ratios[-1] > ratios[0] * 1.8
    assert rows[0]["chars_per_token"] == pytest.approx(1.0, abs=0.02)  # bytes only ~ 1 char each


def test_merges_table_and_truncation(small_bpe):
    table = tokenize.merges_table(small_bpe, limit=5)
    assert [row["rank"] for row in table] == [1, 2, 3, 4, 5]
    assert table[0]["id"] == 256
    smaller = small_bpe.truncated(300)
    assert smaller.vocab_size == 300 and smaller.merges == small_bpe.merges[:43]


def test_bpe_progress_is_reported():
    seen = []
    tok.train_bpe(verdict_text(), 400, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (143, 143)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_bench_bpe_train_reports_seconds():
    result = tf.bench_bpe_train(verdict_text(), 300)
    assert result["vocab_size"] == 300 and result["bpe_train_s"] > 0


# ------------------------------------------------------------------------------ GPT-2


def test_gpt2_offline_known_ids():
    gpt2 = tf.gpt2_tokenizer()
    assert gpt2.encode("Hello, world") == [15496, 11, 995]
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert gpt2.token_text(995) == " world"


def test_gpt2_files_are_checked_against_tiktokens_hashes(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setattr(tf, "GPT2_VOCAB_BPE_SHA256", "0" * 64)
    tf._gpt2_encoding.cache_clear()
    try:
        with pytest.raises(TokenizerError, match="checksum"):
            tf.gpt2_tokenizer()
    finally:
        tf._gpt2_encoding.cache_clear()


# ------------------------------------------------------------------------------ chars and words


def test_char_tokenizer():
    char = tok.train_char("hello world")
    assert char.vocab_size == 2 + len(set("hello world"))
    assert char.decode(char.encode("hello world")) == "hello world"
    assert len(char.encode("hello")) == 5
    assert char.encode("<|endoftext|>") == [char.eot_id]
    ids = char.encode("hi!")  # 'i' and '!' were never seen
    assert ids[1] == ids[2] == char.unk_id
    check = tok.round_trip(char, "hi!")
    assert not check["ok"] and check["first_difference"] == 1


def test_word_tokenizer():
    word = tok.train_word("the cat sat on the mat. the end.", max_vocab=100)
    text = "the cat sat on the mat."
    assert word.decode(word.encode(text)) == text
    assert [word.token_text(i) for i in word.encode("the cat")] == ["the", " cat"]
    assert word.encode(" dog") == [word.unk_id]
    # pieces: "x" once, " x" twice, " y" twice, " z" once; 4 ids = 2 specials + the 2 most frequent
    limited = tok.train_word("x x x y y z", max_vocab=4)
    assert limited.vocab_size == 4
    assert limited.encode(" x y z") == [limited.stoi[" x"], limited.stoi[" y"], limited.unk_id]


# ------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("kind", ["char", "word", "bpe", "gpt2"])
def test_save_load_round_trip(tmp_path, small_bpe, kind):
    text = verdict_text()
    original = {"char": lambda: tok.train_char(text), "word": lambda: tok.train_word(text, 500),
                "bpe": lambda: small_bpe, "gpt2": tf.gpt2_tokenizer}[kind]()
    path = tf.save_tokenizer(original, tmp_path / "tokenizer.json")
    json.loads(path.read_text(encoding="utf-8"))  # plain JSON
    loaded = tf.load_tokenizer(path)
    sample = text[:2000] + " 🙂<|endoftext|>"
    assert loaded.kind == kind
    assert loaded.vocab_size == original.vocab_size
    assert loaded.eot_id == original.eot_id
    assert loaded.encode(sample) == original.encode(sample)
    assert loaded.to_dict() == original.to_dict()


@pytest.mark.parametrize("content", [
    b"not json",
    b"\xff\xfe binary",
    b"[1, 2, 3]",
    b'{"kind": "sentencepiece"}',
    b'{"kind": "bpe"}',
    b'{"kind": "bpe", "merges": [[300, 1]]}',
    b'{"kind": "bpe", "merges": [["a", "b"]]}',
    b'{"kind": "bpe", "merges": [[1, 2], [1, 2]]}',
    b'{"kind": "bpe", "merges": [[1, 2]], "pattern": "("}',
    b'{"kind": "char", "vocab": [1, 2]}',
    b'{"kind": "char", "vocab": ["a", "b"]}',
    b'{"kind": "word", "vocab": ["<|endoftext|>", "<|unk|>", "x", "x"]}',
])
def test_load_rejects_bad_files(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError):
        tf.load_tokenizer(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="No tokeniser file"):
        tf.load_tokenizer(tmp_path / "nope.json")


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("train", [
    lambda: tok.train_bpe("", 300),
    lambda: tok.train_bpe("   \n\t ", 300),
    lambda: tok.train_bpe(b"bytes are not text", 300),
    lambda: tok.train_bpe(None, 300),
    lambda: tok.train_bpe(["a", "list"], 300),
    lambda: tok.train_bpe("some text", 255),
    lambda: tok.train_bpe("some text", 256),
    lambda: tok.train_bpe("some text", 0),
    lambda: tok.train_bpe("some text", -5),
    lambda: tok.train_bpe("some text", 300.5),
    lambda: tok.train_bpe("some text", float("nan")),
    lambda: tok.train_bpe("some text", "1000"),
    lambda: tok.train_bpe("some text", True),
    lambda: tok.train_bpe("some text", 10**9),
    lambda: tok.train_char(""),
    lambda: tok.train_char(b"\x00\x01"),
    lambda: tok.train_word("", 100),
    lambda: tok.train_word("text", 2),
])
def test_bad_training_input_raises_tokenizer_error(train):
    with pytest.raises(TokenizerError) as info:
        train()
    assert isinstance(info.value, GlassBoxError) and str(info.value)


def test_vocab_below_256_message_is_clear():
    with pytest.raises(TokenizerError, match="at least 257"):
        tok.train_bpe("some text", 100)


@pytest.mark.parametrize("kind", ["char", "word", "bpe", "gpt2"])
def test_bad_ids_and_non_text(small_bpe, kind):
    tokenizer = {"char": lambda: tok.train_char("abc"), "word": lambda: tok.train_word("a b", 10),
                 "bpe": lambda: small_bpe, "gpt2": tf.gpt2_tokenizer}[kind]()
    for bad in ([-1], [tokenizer.vocab_size], ["x"], [None]):
        with pytest.raises(TokenizerError):
            tokenizer.decode(bad)
    with pytest.raises(TokenizerError):
        tokenizer.token_text(tokenizer.vocab_size)
    with pytest.raises(TokenizerError):
        tokenizer.encode(b"bytes")


def test_lone_surrogate_is_a_tokenizer_error(small_bpe):
    for tokenizer in (small_bpe, tf.gpt2_tokenizer()):
        with pytest.raises(TokenizerError, match="surrogate"):
            tokenizer.encode("a\ud800b")
    with pytest.raises(TokenizerError):
        tok.train_bpe("abc \udfff", 300)


def test_float_vocab_that_is_whole_is_accepted():
    assert tok.train_bpe("hello hello", 258.0).vocab_size <= 258


# ------------------------------------------------------------------------------ page helpers


def test_token_spans_html_escapes_everything():
    evil = "<script>alert(1)</script><img src=x onerror=alert(2)> & \"'"
    for tokenizer in (tok.train_char(evil), tf.gpt2_tokenizer()):
        out = token_spans_html(tok.token_spans(tokenizer, evil), show_ids=True)
        assert "<script" not in out and "<img" not in out
        assert "&lt;" in out and "&amp;" in out
        assert out.count("<span") == len(tokenizer.encode(evil))


def test_first_difference():
    assert tok.first_difference("abc", "abc") is None
    assert tok.first_difference("abc", "abd") == 2
    assert tok.first_difference("abc", "ab") == 2
    assert tok.first_difference("", "x") == 0


def test_token_spans_and_stats():
    gpt2 = tf.gpt2_tokenizer()
    spans = tok.token_spans(gpt2, "Hello, world")
    assert spans == [{"id": 15496, "text": "Hello"}, {"id": 11, "text": ","}, {"id": 995, "text": " world"}]
    assert tok.chars_per_token("Hello, world", [1, 2, 3]) == 4.0
    assert tok.chars_per_token("", []) == 0.0
    stats = tokenize.corpus_stats("ab\ncd\n")
    assert stats["lines"] == 2 and stats["characters"] == 6 and stats["distinct characters"] == 5
    assert tok.visible(" a\n\t") == "·a↵⇥" and tok.visible("") == "∅"


# ------------------------------------------------------------------------------ specs and runs


def test_tokenizer_from_spec_kinds_and_runs(isolated_workspace):
    text = verdict_text()
    assert tf.tokenizer_from_spec("char", text).kind == "char"
    assert tf.tokenizer_from_spec("word", text).kind == "word"
    assert tf.tokenizer_from_spec("gpt2").kind == "gpt2"
    assert tf.tokenizer_from_spec("bpe:300", text).vocab_size == 300
    saved = tok.train_bpe(text, 300)
    path = tokenize.save_tokenizer_run("my-bpe", saved, {"data": "the-verdict"})
    assert path.name == "tokenizer.json" and path.parent == isolated_workspace["checkpoints"] / "my-bpe"
    loaded = tf.tokenizer_from_spec("my-bpe", "other text")
    assert loaded.merges == saved.merges
    config = json.loads((path.parent / "config.json").read_text())
    assert config["stage"] == "tokenizer" and config["tokenizer"] == "bpe" and config["vocab_size"] == 300
    with pytest.raises(RunExistsError):  # an existing run is never overwritten
        tokenize.save_tokenizer_run("my-bpe", tok.train_char(text), {})
    assert tf.load_tokenizer(path).kind == "bpe"


@pytest.mark.parametrize("spec", ["no-such-run", "../etc", "", "bpe:lots", None])
def test_tokenizer_from_spec_bad(spec):
    with pytest.raises(TokenizerError):
        tf.tokenizer_from_spec(spec, "some text")


def test_spec_needing_text_without_text():
    with pytest.raises(TokenizerError):
        tf.tokenizer_from_spec("char", None)


# ------------------------------------------------------------------------------ command line


def cli_args(**overrides):
    args = {"data": "the-verdict", "tokenizer": "bpe", "vocab_size": 400, "run_id": "tok-cli"}
    args.update(overrides)
    return tokenize.Settings(**args)


def test_tokenize_command_saves_a_run(isolated_workspace):
    result = tokenize.run(cli_args())
    assert result["run_id"] == "tok-cli" and result["vocab_size"] == 400
    assert result["tokens"] > 0 and result["chars_per_token"] > 1.5 and result["seconds"] >= 0
    folder = isolated_workspace["checkpoints"] / "tok-cli"
    config = json.loads((folder / "config.json").read_text())
    assert config["stage"] == "tokenizer" and config["data"] == "the-verdict"
    assert config["tokenizer"] == "bpe" and config["vocab_size"] == 400
    loaded = tf.load_tokenizer(folder / "tokenizer.json")
    assert len(loaded.encode(verdict_text())) == result["tokens"]

    before = (folder / "tokenizer.json").read_bytes()
    with pytest.raises(RunExistsError):
        tokenize.run(cli_args(tokenizer="char"))
    assert (folder / "tokenizer.json").read_bytes() == before


def test_tokenize_command_bad_input(isolated_workspace):
    with pytest.raises(TokenizerError):
        tokenize.run(cli_args(vocab_size=100, run_id="small"))
    with pytest.raises(GlassBoxError):
        tokenize.run(cli_args(data="no-such-corpus", run_id="x"))
    with pytest.raises(GlassBoxError):
        tokenize.run(cli_args(run_id="../escape"))
    assert not any(isolated_workspace["checkpoints"].iterdir())  # nothing half-made was left


def test_tokenize_command_line_prints_json(isolated_workspace):
    proc = subprocess.run(
        [sys.executable, "-m", "core", "tokenize", "--data", "python-docs", "--tokenizer", "char",
         "--run-id", "chars"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"run_id", "vocab_size", "tokens", "chars_per_token", "seconds"}
    assert summary["chars_per_token"] == 1.0
    bad = subprocess.run(
        [sys.executable, "-m", "core", "tokenize", "--data", "python-docs", "--tokenizer", "bpe",
         "--vocab-size", "10", "--run-id", "tiny"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "at least 257" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------ the textbook's naive BPE


@pytest.mark.parametrize("text", [
    None,  # the-verdict's first 6,000 characters
    "aaabdaaabac aaabdaaabac",
    "東京は雨です。東京は晴れ。🙂🙂 naïve naïve café<|endoftext|>café café",
])
def test_naive_and_fast_bpe_learn_the_same_merges(text):
    text = verdict_text()[:6000] if text is None else text
    naive, fast = tok.train_bpe_naive(text, 420), tok.train_bpe(text, 420)
    assert naive.merges == fast.merges and naive.merges  # the same merges, in the same order
    sample = text[:500]
    assert naive.encode(sample) == fast.encode(sample)


def test_the_naive_bpe_is_short_enough_to_read():
    import inspect

    assert len(inspect.getsource(tok.train_bpe_naive).splitlines()) <= 24


# ------------------------------------------------------------------------------ ByteLevelBPE (tiktoken)


CHATML = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}


def chatml_like(bpe: tok.BPETokenizer) -> tf.ByteLevelBPE:
    """Our merges shifted by 3 ids, under three special tokens at 0-2 (SmolLM2's layout)."""
    ranks = {data: i + 3 for i, data in enumerate(bpe.token_bytes)}
    return tf.ByteLevelBPE("chatml-like", bpe.pattern, ranks, CHATML, eot_token="<|im_end|>")


def test_bytelevel_bpe_with_its_own_special_tokens(small_bpe):
    t = chatml_like(small_bpe)
    assert t.vocab_size == len(small_bpe.token_bytes) + 3 and t.eot_id == 2
    assert t.special_ids() == {0, 1, 2}
    prompt = "<|im_start|>user\nHello, world<|im_end|>"
    ids = t.encode(prompt)
    assert ids[0] == 1 and ids[-1] == 2 and t.decode(ids) == prompt
    assert [i - 3 for i in ids[1:-1]] == small_bpe.encode("user\nHello, world")  # the same merges
    assert 1 not in t.encode_ordinary(prompt)  # typed marker text stays text
    assert t.token_text(1) == "<|im_start|>"
    with pytest.raises(TokenizerError):
        t.decode([t.vocab_size])


def test_bytelevel_bpe_saves_and_loads_as_json(tmp_path, small_bpe):
    t = chatml_like(small_bpe)
    path = tf.save_tokenizer(t, tmp_path / "tokenizer.json")
    assert "ranks" in json.loads(path.read_text(encoding="utf-8"))
    loaded = tf.load_tokenizer(path)
    sample = verdict_text()[:3000] + "<|im_start|>🙂<|im_end|>"
    assert loaded.kind == "bytelevel" and loaded.encode(sample) == t.encode(sample)
    assert loaded.eot_id == 2 and loaded.to_dict() == t.to_dict()


def test_bytelevel_bpe_from_ours_encodes_like_ours(small_bpe):
    fast = tf.ByteLevelBPE.from_bpe(small_bpe)
    for text in TRICKY + [verdict_text()]:
        assert fast.encode(text) == small_bpe.encode(text)
    assert fast.vocab_size == small_bpe.vocab_size and fast.eot_id == small_bpe.eot_id


@pytest.mark.parametrize("broken", [
    lambda d: d.update(ranks="nope"),
    lambda d: d.update(ranks=[["!!notbase64", 5]]),
    lambda d: d["ranks"].append(["YQ==", 7]),  # the bytes of "a" twice
    lambda d: d.update(eot_token="<|nope|>"),
    lambda d: d.update(special_tokens={"<|endoftext|>": 5, "<|im_start|>": 1, "<|im_end|>": 2}),  # id taken
    lambda d: d.update(pattern="("),
    lambda d: d.pop("pattern"),
])
def test_broken_bytelevel_files_are_refused(tmp_path, small_bpe, broken):
    d = chatml_like(small_bpe).to_dict()
    broken(d)
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(TokenizerError):
        tf.load_tokenizer(tmp_path / "t.json")


# ------------------------------------------------------------------------------ the stage contract


def test_tokenize_settings_round_trip_the_command_line():
    from core.lab import cli

    s = tokenize.Settings(data="the-verdict", tokenizer="word", vocab_size=500, run_id="w")
    assert cli.to_argv(s) == ["--data", "the-verdict", "--tokenizer", "word", "--vocab-size", "500", "--run-id", "w"]
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser, tokenize.Settings)
    assert cli.settings_from_args(tokenize.Settings, parser.parse_args(cli.to_argv(s))) == s
    with pytest.raises(TokenizerError):
        tokenize.Settings(data="")
    with pytest.raises(TokenizerError):
        tokenize.Settings(data="x", tokenizer="sentencepiece")


def test_a_tokeniser_run_is_finished_with_no_pid(isolated_workspace, small_bpe):
    result = tokenize.run(tokenize.Settings(data="the-verdict", run_id="given"), trained=small_bpe)
    status = json.loads((isolated_workspace["checkpoints"] / "given" / "status.json").read_text())
    assert status["state"] == "finished" and "pid" not in status
    assert result["vocab_size"] == 600
    assert tf.load_tokenizer(isolated_workspace["checkpoints"] / "given" / "tokenizer.json").merges == small_bpe.merges
    saved = tokenize.results("given")
    assert saved["config"]["corpus_tokens"] == result["tokens"] and saved["tokenizer"].merges == small_bpe.merges


# ------------------------------------------------------------------------------ the one token HTML helper


def test_special_tokens_are_highlighted_and_hover_text_is_escaped(small_bpe):
    from pages._ui.tokens import SPECIAL_STYLE, readable_token, spans_of

    t = chatml_like(small_bpe)
    spans = spans_of(t, t.encode("<|im_start|>a b<|im_end|>"))
    assert [s["special"] for s in spans] == [True, False, False, True]
    out = token_spans_html(spans, title=lambda s: '"><script>')
    assert out.count(SPECIAL_STYLE) == 2 and "<script" not in out and "&quot;&gt;&lt;script&gt;" in out
    assert readable_token(t, t.encode(" b")[0]) == "·b"


def test_a_byte_without_a_token_is_dropped_as_transformers_does(small_bpe):
    """SmolLM2 has no token for a few control bytes (4, 6, 19, ...); its own tokenizer drops them."""
    ranks = {data: i + 3 for i, data in enumerate(small_bpe.token_bytes) if data not in (b"\x04", b"\x06")}
    t = tf.ByteLevelBPE("holes", small_bpe.pattern, ranks, CHATML, eot_token="<|im_end|>")
    assert t.missing_bytes == b"\x04\x06" and t.vocab_size == max(ranks.values()) + 1
    assert t.decode(t.encode("fine text 🙂")) == "fine text 🙂"
    ids = t.encode("abc\x04def\x06")
    assert all(i < t.vocab_size for i in ids) and t.decode(ids) == "abcdef"
    assert t.encode_ordinary("\x06") == []
    loaded = tf.tokenizer_from_dict(json.loads(json.dumps(t.to_dict())))
    assert loaded.encode("abc\x04def\x06") == ids and loaded.vocab_size == t.vocab_size
    with pytest.raises(TokenizerError):
        t.decode([t.vocab_size])  # a placeholder id is not a token


def test_a_colour_callback_colours_spans_and_only_colours_pass(small_bpe):
    spans = tok.token_spans(small_bpe, "ab cd")
    out = token_spans_html(spans, colour=lambda s: "rgba(220, 38, 38, 0.5)")
    assert out.count("background:rgba(220, 38, 38, 0.5)") == len(spans)
    with pytest.raises(ValueError):
        token_spans_html(spans, colour=lambda s: 'red;" onmouseover="alert(1)')
