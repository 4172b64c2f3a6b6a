"""GGUF export (streamline_jax/export_gguf.py): tiny pruned models written as GGUF, read back by our own reader and
run by llama.cpp itself (llama-cpp-python, built by scripts/setup.sh --test), whose last-position logits and greedy
tokens must match ours."""

from __future__ import annotations

import copy
import json

import jax
import yaml
import numpy as np
import pytest

import streamline_jax as sj
from conftest import rel_err
from reference import params_from_torch, torch_model
from streamline_jax import pruning
from streamline_jax.export import ExportError
from streamline_jax.export_gguf import export_gguf, follows_period, gemma_period_spans
from streamline_jax.gguf_file import field, open_gguf
from streamline_jax.models.config import from_hf_config
from streamline_jax.models.model import Model, forward
from tiny import CONFIGS, GEMMA_HF, sentences, vocab_gguf

GEMMA6 = dict(GEMMA_HF, num_hidden_layers=6, query_pre_attn_scalar=16)  # llama.cpp scales queries by head_dim
FAMILIES = {
    "llama": CONFIGS["llama_gqa_tied"].replace(num_layers=6, layout=()),
    "llama_untied_bias": CONFIGS["llama_bias"].replace(num_layers=6, layout=(), tie_word_embeddings=False),
    "qwen2": CONFIGS["qwen2_untied"].replace(num_layers=6, layout=()),
    "qwen3": CONFIGS["qwen3"].replace(num_layers=6, layout=()),
    "gemma2": from_hf_config(dict(GEMMA6, model_type="gemma2", attn_logit_softcapping=0.05,
                                  final_logit_softcapping=1.0)),
    "gemma3": from_hf_config(dict(GEMMA6, model_type="gemma3_text", rope_theta=1000000.0,
                                  rope_local_base_freq=100.0, tie_word_embeddings=False)),
}
PROMPT = [1, 17, 42, 99, 5, 63, 8, 120, 33, 2, 77, 11]  # longer than Gemma's 4-slot window
# q8_0 (llama.cpp also rounds the activations to 8 bits in its q8_0 products) against our float32, last position's
# logits relative to their largest magnitude, measured on these models: llama 8.5e-3, llama with biases 8.5e-3,
# qwen2 2.9e-2, qwen3 1.6e-2, gemma2 1.5e-2, gemma3 6.3e-2 (f32: at most 7.6e-4, gemma3). Greedy tokens may differ.
Q8_0_BOUND = 0.1


def pruned_model(config, start=1, length=3, replacement="layer"):
    """A tiny random model with a span pruned; a `layer` block perturbed, so that it is no copy of any layer. The
    q/k projections are scaled up so that attention (and so the rotary embedding and the q/k row order) shows in
    the logits."""
    sharpen = lambda path, v: v * 4 if {"q_proj", "k_proj"} & {getattr(k, "key", None) for k in path} else v
    params = jax.tree_util.tree_map_with_path(sharpen, params_from_torch(config, torch_model(config)))
    model = Model(config, params, None)
    pruned = pruning.prune(model, start, length, replacement)
    if replacement != "none":
        key = next(k for k, s in zip(pruned.params["segments"], pruned.config.layout) if s.kind != "layers")
        pruned.params["segments"][key] = jax.tree.map(lambda v: v * 1.3 + 0.01, pruned.params["segments"][key])
    return pruned


def export(tmp_path, model, gguf_type="f32"):
    vocab = vocab_gguf(tmp_path / "vocab.gguf", model.config.vocab_size)
    return export_gguf(model, tmp_path / "gguf" / f"m-{gguf_type}.gguf", gguf_type, tokenizer_source=vocab,
                       facts={"base_model": "tiny/random", "params_before": 12345})


def llama_cpp(path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama_cpp (llama-cpp-python) is not installed; "
                                                       "`bash scripts/setup.sh --test` builds and installs it")
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=2, verbose=False,
                           logits_all=True, type_k=0, type_v=0)  # float32 KV cache: the f16 default rounds


def llama_cpp_run(llm, prompt, new_tokens=8):
    """The last position's logits of `prompt` and the greedy continuation, in llama.cpp."""
    llm.reset()
    llm.eval(prompt)
    logits = np.array(llm.scores[len(prompt) - 1])
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([tokens[-1]])
    return logits, tokens


def ours_run(model, prompt, new_tokens=8):
    logits = np.asarray(forward(model, np.array([prompt])))[0, -1]
    tokens = sj.generate(model, [prompt], new_tokens, eos_token_id=()).tokens[0]
    return logits, tokens


# --------------------------------------------------------------------------------------------------------------
# Without llama.cpp


@pytest.mark.parametrize("family", ["llama", "llama_untied_bias", "qwen2", "qwen3"])
def test_gguf_reads_back_as_the_pruned_model(tmp_path, family):
    pruned = pruned_model(FAMILIES[family])
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / ".m-f32.gguf.tmp-x1y2").write_text("as a writer killed before its rename leaves it")
    path = export(tmp_path, pruned)
    back = sj.load(path)
    assert back.config.depth == pruned.config.depth == 4
    ids = np.array([PROMPT])
    assert rel_err(forward(back, ids), forward(pruned, ids)) < 1e-5
    reader = open_gguf(path)
    assert field(reader, "tokenizer.ggml.tokens")[3] == "<0x0A>"
    assert field(reader, "tokenizer.chat_template").startswith("{% for m in messages")
    assert field(reader, "general.tags") == ["pruned", "llm-streamline"]
    assert "layers 1-3 (3) replaced by one `layer` block" in field(reader, "general.description")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize("replacement", ["ffn", "mlp", "linear"])
def test_blocks_llama_cpp_cannot_run_are_refused_by_name(tmp_path, replacement):
    pruned = pruned_model(FAMILIES["llama"], replacement=replacement)
    with pytest.raises(ExportError, match=f"`{replacement}` replacement block.*replacement=layer or none"):
        export(tmp_path, pruned)
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())


def export_with_per_layer_source(tmp_path):
    """A pruned model exported with a source GGUF whose metadata holds per-layer arrays."""
    import gguf

    pruned = pruned_model(FAMILIES["llama"], 1, 3, "layer")  # keeps original layers 0, 1 (the block), 4, 5
    source = tmp_path / "source.gguf"
    w = gguf.GGUFWriter(str(source), "llama")
    w.add_block_count(6)
    w.add_key_value("llama.attention.head_count_kv", [2] * 6, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    w.add_key_value("llama.test_per_layer", list(range(6)), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    w.add_key_value("llama.test_scalar", 7, gguf.GGUFValueType.UINT32)
    for key, f in open_gguf(vocab_gguf(tmp_path / "vocab.gguf", 128)).fields.items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pruned, export_gguf(pruned, tmp_path / "out.gguf", "f32", tokenizer_source=source)


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    import streamline_jax.export_gguf as export_gguf_mod

    def broken(*args):
        yield "token_embd.weight", np.zeros((128, 64), np.float32)
        raise OSError("disk full")

    monkeypatch.setattr(export_gguf_mod, "gguf_tensors", broken)
    with pytest.raises(OSError, match="disk full"):
        export(tmp_path, pruned_model(FAMILIES["llama"]))
    assert list((tmp_path / "gguf").iterdir()) == []


def test_per_layer_metadata_of_the_source_is_sliced_to_the_kept_layers(tmp_path):
    """llama.cpp's own --prune-layers leaves such arrays whole, and its files then fail to load."""
    _, path = export_with_per_layer_source(tmp_path)
    reader = open_gguf(path)
    assert field(reader, "llama.test_per_layer") == [0, 1, 4, 5]
    assert field(reader, "llama.attention.head_count_kv") == [2] * 4
    assert field(reader, "llama.test_scalar") == 7 and field(reader, "llama.block_count") == 4


def test_gemma_period_rule():
    """llama.cpp derives the sliding/full pattern from a period where the file has no per-layer array: the spans
    whose pruning keeps that period (we write the array, so every span is exported exactly)."""
    config = FAMILIES["gemma2"]  # S F S F S F
    assert follows_period(config.layer_types, 2)
    assert gemma_period_spans(config, 1, block=False) == [5]
    assert gemma_period_spans(config, 2, block=False) == [0, 1, 2, 3, 4]
    assert gemma_period_spans(config, 3, block=True) == [0, 1, 2, 3]
    assert gemma_period_spans(config, 2, block=True) == [4]  # the block keeps its first layer's type


def test_gemma_needs_query_scale_of_head_dim(tmp_path):
    config = from_hf_config(dict(GEMMA_HF, num_hidden_layers=6, model_type="gemma2"))  # query_pre_attn_scalar 32
    with pytest.raises(ExportError, match="query_pre_attn_scalar=32"):
        export(tmp_path, pruned_model(config))


# --------------------------------------------------------------------------------------------------------------
# llama.cpp itself


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("replacement", ["layer", "none"])
def test_llama_cpp_runs_the_export_like_we_do(tmp_path, family, replacement):
    pruned = pruned_model(FAMILIES[family], 1, 1 if family.startswith("gemma") else 3, replacement)
    llm = llama_cpp(export(tmp_path, pruned))
    theirs, their_tokens = llama_cpp_run(llm, PROMPT)
    ours, our_tokens = ours_run(pruned, PROMPT)
    assert rel_err(theirs, ours) <= 2e-3
    assert their_tokens == our_tokens


def test_llama_cpp_loads_sliced_per_layer_metadata(tmp_path):
    pruned, path = export_with_per_layer_source(tmp_path)
    theirs, _ = llama_cpp_run(llama_cpp(path), PROMPT, 0)
    assert rel_err(theirs, ours_run(pruned, PROMPT, 1)[0]) <= 2e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_q8_0_within_the_measured_bound(tmp_path, family):
    pruned = pruned_model(FAMILIES[family])
    theirs, _ = llama_cpp_run(llama_cpp(export(tmp_path, pruned, "q8_0")), PROMPT)
    ours, _ = ours_run(pruned, PROMPT)
    assert rel_err(theirs, ours) <= Q8_0_BOUND


@pytest.mark.parametrize("gguf_type", ["f16", "bf16"])
def test_llama_cpp_loads_half_precision_exports(tmp_path, gguf_type):
    pruned = pruned_model(FAMILIES["llama"])
    theirs, _ = llama_cpp_run(llama_cpp(export(tmp_path, pruned, gguf_type)), PROMPT)
    ours, _ = ours_run(pruned, PROMPT)
    assert rel_err(theirs, ours) <= 2e-2


# --------------------------------------------------------------------------------------------------------------
# The run and scripts/convert.py


def tiny_gguf_source(tmp_path):
    """A tiny dense random Llama as a GGUF with a tiny vocabulary: a model source the run can export a GGUF of."""
    dense = Model(FAMILIES["llama"], params_from_torch(FAMILIES["llama"], torch_model(FAMILIES["llama"])), None)
    vocab = vocab_gguf(tmp_path / "vocab.gguf", 128)
    return export_gguf(dense, tmp_path / "tiny.gguf", "f32", tokenizer_source=vocab, facts={"license": "apache-2.0"})


@pytest.mark.pipeline
def test_run_writes_the_gguf_by_default(tiny_files, tmp_path):
    from streamline_jax import run as run_mod

    source, out, d = tiny_gguf_source(tmp_path), tmp_path / "out", tiny_files["data"]
    args = ["--model", str(source), "--out", str(out), "--quiet", "--stages", "score,prune,train,save",
            f"data.calibration={d / 'train.jsonl'}", "data.seq_len=32", "data.calib_chunks=4", "data.train_chunks=8",
            "data.batch_size=4", "score.sparsity=null", "score.num_layers=2", "eval.tasks=[]", "train.lr=1e-3",
            "train.distill_steps=0"]
    assert run_mod.main(args) == 0
    path = out / "gguf" / "tiny-pruned-f16.gguf"
    assert [p.name for p in (out / "gguf").iterdir()] == [path.name]
    pruned, back = sj.load(out / "model"), sj.load(path)
    assert back.config.depth == pruned.config.depth == 5
    ids = np.array([PROMPT])
    assert rel_err(forward(back, ids), forward(pruned, ids)) < 1e-2  # f16 weights
    reader = open_gguf(path)
    assert field(reader, "general.file_type") == 1 and field(reader, "tokenizer.ggml.model") == "llama"
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["outputs"]["gguf"].startswith("gguf/tiny-pruned-f16.gguf")
    assert field(reader, "general.license") == "apache-2.0"
    card = (out / "hf" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and {"pruned", "llm-streamline"} <= set(front["tags"])
    assert front["base_model"] == str(source)
    span = report["span"]
    assert f"- layers {span['start']}..{span['end'] - 1} (2 layers), chosen by" in card
    assert f"- parameters: {report['params']['dense']:,} → {report['params']['pruned']:,}" in card
    assert "replacement: layer" in card  # the recipe
    assert "python -m streamline_jax.run --model " + str(source) in card and "score.num_layers=2" in card


@pytest.mark.pipeline
def test_run_without_a_gguf_source_says_why_no_gguf(tiny_files, tmp_path):
    from streamline_jax import run as run_mod

    out, d = tmp_path / "out", tiny_files["data"]
    args = ["--model", str(tiny_files["llama"]), "--out", str(out), "--quiet", "--stages", "score,prune,save",
            f"data.calibration={d / 'train.jsonl'}", "data.seq_len=32", "data.calib_chunks=4", "data.batch_size=4",
            "score.sparsity=null", "score.num_layers=2", "eval.tasks=[]", "prune.replacement=none"]
    assert run_mod.main(args) == 0
    report = __import__("json").loads((out / "report.json").read_text())
    assert "not a byte-level BPE tokenizer" in report["outputs"]["gguf"]
    assert not (out / "gguf").exists()


def convert_script():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("convert", Path(__file__).parents[1] / "scripts" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    return convert


def test_convert_writes_gguf_from_orbax_and_refuses_blocks_by_name(tmp_path, capsys):
    convert = convert_script()
    from streamline_jax.export import save_orbax_model

    vocab = vocab_gguf(tmp_path / "vocab.gguf", 128)
    pruned = pruned_model(FAMILIES["qwen3"], 2, 2, "none")
    save_orbax_model(pruned, tmp_path / "orbax")
    target = tmp_path / "m.gguf"
    assert convert.main([str(tmp_path / "orbax"), str(target), "--to", "gguf", "--gguf-type", "q8_0",
                         "--tokenizer", str(vocab)]) == 0
    back = sj.load(target)
    assert back.config.depth == 4 and field(open_gguf(target), "general.file_type") == 7
    save_orbax_model(pruned_model(FAMILIES["llama"], replacement="mlp"), tmp_path / "mlp")
    assert convert.main([str(tmp_path / "mlp"), str(tmp_path / "x.gguf"), "--to", "gguf", "--tokenizer",
                         str(vocab)]) == 2
    assert "`mlp` replacement block" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()
    assert convert.main([str(tmp_path / "orbax"), str(tmp_path / "y.gguf"), "--to", "gguf"]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_convert_writes_gguf_from_a_hugging_face_folder(tmp_path, capsys):
    convert = convert_script()
    config = FAMILIES["llama"].replace(vocab_size=320)
    folder, _ = byte_bpe_folder(tmp_path / "hf", 300)
    torch_model(config).save_pretrained(str(folder))
    assert convert.main([str(folder), str(tmp_path / "m.gguf"), "--to", "gguf", "--gguf-type", "f32"]) == 0
    reader = open_gguf(tmp_path / "m.gguf")
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2" and field(reader, "llama.block_count") == 6
    ids = np.array([PROMPT])
    assert rel_err(forward(sj.load(tmp_path / "m.gguf"), ids), forward(sj.load(folder), ids)) < 1e-5


# --------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers


def byte_bpe_folder(folder, vocab_size):
    """A Hugging Face folder with a tiny byte-level BPE tokenizer (GPT-2's pre-tokenizer), `vocab_size` tokens."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(300, 0), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return folder, fast


def test_hf_tokenizer_pre_tokenizers_are_named_or_refused():
    from streamline_jax.gguf_vocab import PRE_TOKENIZERS, describe

    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "add_prefix_space": False,
                                                     "use_regex": True}]}
    assert PRE_TOKENIZERS[describe(smollm)] == "smollm"
    assert describe({"type": "Whitespace"}) not in PRE_TOKENIZERS


def test_gguf_from_hf_tokenizer_tokenizes_like_it_in_llama_cpp(tmp_path):
    from streamline_jax.gguf_vocab import hf_vocab_fields

    config = FAMILIES["qwen2"].replace(vocab_size=320)
    folder, tok = byte_bpe_folder(tmp_path / "hf", 300)
    fields = dict(hf_vocab_fields(folder, config.vocab_size))
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and len(fields["tokenizer.ggml.tokens"]) == 320
    assert fields["tokenizer.ggml.tokens"][319] == "[PAD319]" and fields["tokenizer.ggml.eos_token_id"] == 0
    model = Model(config, params_from_torch(config, torch_model(config)), None)
    path = export_gguf(model, tmp_path / "m.gguf", "f32", tokenizer_source=folder)
    llm = llama_cpp(path)
    text = "the big cat sat on 12 red mats, near the river!"
    assert llm.tokenize(text.encode(), add_bos=False) == tok(text)["input_ids"]


SPM_TEXTS = ["the big cat sat on a mat.", "  two  spaces\nand a newline\n", "Caf\u00e9 \u20ac na\u00efve", " lead"]
# tokenizer.json's normalizer and pre-tokenizer as Llama-2 (and Mistral) ship them, as Gemma ships them (no space
# prepended; a Split on spaces the normalizer has already replaced), and as newer transformers write Llama-2's
# (refused: see the test of refusals)
SPM_SHAPES = {"llama2": (["prepend", "replace"], None), "metaspace": ([], "metaspace"), "gemma": (["replace"], "split")}


def spm_tokenizer(shape="llama2", complete_merges=True):
    """A tiny SentencePiece-style tokenizer (BPE with byte fallback over <unk>, <s>, </s>, the 256 byte tokens and
    54 pieces): the merges are those of BPE training, completed as SentencePiece's converted vocabularies are
    (every split of a piece into two pieces is a merge, ranked by the piece)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    trained = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(sentences(300, 0), trainers.BpeTrainer(vocab_size=55, special_tokens=["<unk>"]))
    pieces = sorted(trained.get_vocab().items(), key=lambda kv: kv[1])[1:]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
                                        + [t for t, _ in pieces])}
    merges = [(t[:i], t[i:]) for t, _ in pieces for i in range(1, len(t)) if t[:i] in vocab and t[i:] in vocab]
    if not complete_merges:
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                  for m in json.loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = {"prepend": normalizers.Prepend("\u2581"), "replace": normalizers.Replace(" ", "\u2581")}
    normalizer, pre = SPM_SHAPES[shape]
    if normalizer:
        tok.normalizer = normalizers.Sequence([steps[n] for n in normalizer])
    if pre == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    if pre == "split":
        tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def spm_folder(folder, shape="llama2", complete_merges=True):
    import transformers

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=spm_tokenizer(shape, complete_merges),
                                                unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(folder))
    return folder, fast


@pytest.mark.parametrize("family,shape", [("llama", "llama2"), ("gemma3", "gemma")])
def test_gguf_from_sentencepiece_style_tokenizer_tokenizes_and_runs_like_it(tmp_path, family, shape):
    """Llama-2's, Mistral's and Gemma's tokenizer.json (BPE with byte fallback) become llama.cpp's SentencePiece
    tokenizer: llama.cpp splits texts with spaces, newlines and characters outside the vocabulary (byte fallback)
    as the Hugging Face tokenizer does, and runs the pruned model like we do."""
    config = FAMILIES[family].replace(vocab_size=320)
    folder, tok = spm_folder(tmp_path / "hf", shape)
    pruned = pruned_model(config, 1, 1 if family.startswith("gemma") else 3)
    path = export_gguf(pruned, tmp_path / "m.gguf", "f32", tokenizer_source=folder)
    reader = open_gguf(path)
    assert field(reader, "tokenizer.ggml.model") == "llama" and field(reader, "tokenizer.ggml.unknown_token_id") == 0
    llm = llama_cpp(path)
    for text in SPM_TEXTS + sentences(20, 9):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False) == ids, text
    assert 3 + 0xC3 in tok(SPM_TEXTS[2], add_special_tokens=False)["input_ids"]  # byte fallback was used
    prompt = tok(SPM_TEXTS[0] + SPM_TEXTS[1])["input_ids"]
    theirs, their_tokens = llama_cpp_run(llm, prompt)
    ours, our_tokens = ours_run(pruned, prompt)
    assert rel_err(theirs, ours) <= 2e-3
    assert their_tokens == our_tokens


def test_sentencepiece_style_tokenizers_llama_cpp_would_split_differently_are_refused(tmp_path):
    from streamline_jax.gguf_vocab import VocabError, hf_vocab_fields

    folder, _ = spm_folder(tmp_path / "trained", complete_merges=False)  # BPE training's merges only
    with pytest.raises(VocabError, match="splits into .* which is not a merge"):
        hf_vocab_fields(folder, 320)
    folder, tok = spm_folder(tmp_path / "metaspace", "metaspace")
    assert tok.convert_ids_to_tokens(tok(" lead")["input_ids"])[:2] == ["\u2581", "l"]  # llama.cpp: "\u2581", "\u2581"
    with pytest.raises(VocabError, match=r"pre-tokenizer \['Metaspace\(\u2581,first,split=False\)'\]"):
        hf_vocab_fields(folder, 320)
    spec = json.loads((spm_folder(tmp_path / "hf")[0] / "tokenizer.json").read_text())
    for name, change, error in [
            ("bytes", lambda s: s["model"]["vocab"].pop("<0x41>"), r"without the byte tokens \['<0x41>'\]"),
            ("ranks", lambda s: s["model"]["merges"].append(s["model"]["merges"][0]), "not ranked together"),
            ("split", lambda s: s.update(normalizer=None, pre_tokenizer={
                "type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}),
             r"normalizer and pre-tokenizer \['Metaspace\(\u2581,always,split=True\)'\]"),
            ("unigram", lambda s: s.update(model={"type": "Unigram", "vocab": [["<unk>", 0.0]]}),
             "not a byte-level BPE tokenizer nor a SentencePiece-style")]:
        broken = copy.deepcopy(spec)
        change(broken)
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps(broken))
        with pytest.raises(VocabError, match=error):
            hf_vocab_fields(tmp_path / name, 320)


# --------------------------------------------------------------------------------------------------------------
# The real model


@pytest.mark.slow
def test_default_run_gguf_continues_the_sample_prompts_like_we_do(tiny_files, tmp_path):
    """The default run's save stage on the embedded SmolLM2 (scored on tiny data, the `layer` block untrained:
    what this proves is the export): its GGUF (f16, tokenizer from the embedded GGUF) is tokenized by llama.cpp as
    we tokenize the README's sample prompts and continues them with our greedy tokens."""
    from streamline_jax import run as run_mod
    from streamline_jax.settings import build_config

    out, d = tmp_path / "out", tiny_files["data"]
    assert run_mod.main(["--out", str(out), "--quiet", "--stages", "score,prune,save",
                         f"data.calibration={d / 'train.jsonl'}", "data.seq_len=32", "data.calib_chunks=2",
                         "data.batch_size=2", "export.hf=false", "export.orbax=true"]) == 0
    c, _ = build_config("smollm2-135m", None, [])
    path = out / "gguf" / "smollm2-135m-pruned-f16.gguf"
    pruned = sj.load(out / "model")
    assert field(open_gguf(path), "llama.block_count") == pruned.config.depth < 30
    llm = llama_cpp(path)
    new_tokens = c.samples.max_new_tokens
    ours = sj.generate(pruned, list(c.samples.prompts), new_tokens, eos_token_id=())
    for prompt, prompt_ids, tokens in zip(c.samples.prompts, ours.prompt_tokens, ours.tokens):
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == prompt_ids
        assert llama_cpp_run(llm, prompt_ids, new_tokens)[1] == tokens, prompt


def test_model_card_holds_the_evaluation_table():
    from streamline_jax.model_card import model_card

    report = {"config": {"model": {"source": "smollm2-135m", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                         "prune": {"replacement": "layer"}},
              "span": {"start": 20, "end": 26, "length": 6, "metric": "angular", "replacement": "layer"},
              "params": {"dense": 134515008, "pruned": 115000000, "dense_layers": 30, "pruned_layers": 25},
              "retention": {"rows": [{"task": "piqa", "metric": "acc", "dense": 0.66, "pruned": 0.61,
                                      "retention": 0.924}]},
              "command": "python -m streamline_jax.run --model smollm2-135m"}
    card = model_card(report, "apache-2.0")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0",
                     "library_name": "transformers", "pipeline_tag": "text-generation",
                     "tags": ["pruned", "llm-streamline", "streamline-jax"]}
    assert "| piqa | acc | 0.6600 | 0.6100 | 92.40% |" in card
    assert "- layers 20..25 (6 layers), chosen by angular, replaced by one `layer` block" in card
    assert "- parameters: 134,515,008 → 115,000,000 (85.49%); layers 30 → 25" in card
