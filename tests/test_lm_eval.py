"""lm-evaluation-harness through our adapter (`streamline-jax`) against lm-eval's own `hf` model on the same weights:
log-likelihoods, is_greedy, rolling log-likelihoods, greedy generations and whole tasks (offline PIQA and WikiText);
our own evaluator's PIQA against lm-eval's; bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import streamline_jax as sj  # noqa: E402
from conftest import shared_data  # noqa: E402
from helpers import run_python  # noqa: E402
from streamline_jax import evaluation as ev  # noqa: E402
from streamline_jax import tasks as tk  # noqa: E402
from streamline_jax.lm_eval import StreamlineLM, StreamlineLMError, write_offline_tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [("Question: the cat sat on a mat?\nAnswer:", " the dog ran to the house."),
         ("Question: the cat sat on a mat?\nAnswer:", " big red tree."),
         ("the sun and the moon ", "sang a happy song"),
         ("", "the bird sang."),
         ("the river " * 90, " walked slowly under the old tree.")]  # longer than the context: cut from the left
TEXTS = ["the cat sat on a mat and ran to the house. " * 40, "a big red tree near the river."]
PROMPTS = ["the cat sat on", "a big red tree near the", "the sun and the moon walked quickly under the"]


def requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def bos_tokenizer_folder(src: Path, dst: Path) -> Path:
    """A copy of a tiny model folder whose tokenizer adds BOS, as Llama-2/3's do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(str(src))
    tok._tokenizer.post_processor = TemplateProcessing(single="<eos> $A", pair="<eos> $A $B",
                                                       special_tokens=[("<eos>", tok.eos_token_id)])
    tok.save_pretrained(str(dst))
    assert tok("the cat")["input_ids"][0] == tok.eos_token_id
    return dst


@pytest.fixture(scope="module")
def folders(tiny_files, tmp_path_factory):
    return {"llama": tiny_files["llama"], "opt": tiny_files["opt"],
            "llama_bos": bos_tokenizer_folder(tiny_files["llama"], tmp_path_factory.mktemp("bos") / "llama")}


@pytest.fixture(scope="module")
def offline_tasks(tiny_files, tmp_path_factory):
    return write_offline_tasks(tmp_path_factory.mktemp("tasks"), tiny_files["shared"])


def both(folder, **kwargs):
    ours = StreamlineLM(pretrained=str(folder), batch_size=4, **kwargs)
    theirs = HFLM(pretrained=str(folder), batch_size=4, device="cpu", dtype="float32", **kwargs)
    return ours, theirs


@pytest.mark.parametrize("name", ["llama", "opt", "llama_bos"])
def test_requests_match_hf(folders, name):
    ours, theirs = both(folders[name])
    assert ours.max_length == theirs.max_length == 256
    want = theirs.loglikelihood(requests("loglikelihood", PAIRS))
    got = ours.loglikelihood(requests("loglikelihood", PAIRS))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    rolling = requests("loglikelihood_rolling", [(t,) for t in TEXTS])
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling), rtol=1e-4)
    options = {"until": ["."], "max_gen_toks": 12, "do_sample": False}
    gen = requests("generate_until", [(p, options) for p in PROMPTS])
    assert ours.generate_until(gen) == theirs.generate_until(gen)
    gen = requests("generate_until", [(p, {"until": [], "max_gen_toks": 20}) for p in PROMPTS])
    assert ours.generate_until(gen) == theirs.generate_until(gen)


def test_is_greedy_is_true_for_the_models_own_continuation(folders):
    ours = StreamlineLM(pretrained=str(folders["llama"]))
    text = ours.generate_until(requests("generate_until", [("the cat sat", {"until": [], "max_gen_toks": 6})]))[0]
    (ll, greedy), (_, not_greedy) = ours.loglikelihood(requests("loglikelihood", [("the cat sat", text),
                                                                                  ("the cat sat", " zzz")]))
    assert greedy and not not_greedy and ll < 0


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_offline_tasks_match_hf(folders, offline_tasks, name):
    manager = TaskManager(include_path=str(offline_tasks))
    ours, theirs = both(folders[name])
    results = [simple_evaluate(model=lm, tasks=["piqa_local", "wikitext_local"], task_manager=manager,
                               log_samples=True) for lm in (ours, theirs)]
    (got, want) = [r["results"] for r in results]
    assert got["piqa_local"]["acc,none"] == want["piqa_local"]["acc,none"]
    assert got["piqa_local"]["acc_norm,none"] == want["piqa_local"]["acc_norm,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert got["wikitext_local"][metric] == pytest.approx(want["wikitext_local"][metric], rel=1e-4)
    (got, want) = [[s["filtered_resps"] for s in r["samples"]["piqa_local"]] for r in results]
    np.testing.assert_allclose(np.array(got, float), np.array(want, float), rtol=1e-4)
    assert results[0]["samples"]["piqa_local"][0]["target"] in (0, 1)


def our_piqa(model, lm, manager, limit):
    """Our evaluator and lm-eval (through `lm`) on the same PIQA items."""
    ours = ev.evaluate(model, "piqa", limit=limit)["tasks"]["piqa"]
    theirs = simple_evaluate(model=lm, tasks=["piqa_local"], task_manager=manager, limit=limit, log_samples=True)
    lls = [[float(x[0]) for x in s["filtered_resps"]] for s in theirs["samples"]["piqa_local"]]
    return ours, theirs["results"]["piqa_local"], lls


@pytest.mark.parametrize("name", ["llama", "llama_bos"])
def test_our_piqa_equals_lm_evals(folders, offline_tasks, tiny_files, monkeypatch, name):
    monkeypatch.setenv("STREAMLINE_JAX_DATA", str(tiny_files["shared"]))
    model = sj.load(folders[name])
    ours, theirs, lls = our_piqa(model, HFLM(pretrained=str(folders[name]), batch_size=4, device="cpu"),
                                 TaskManager(include_path=str(offline_tasks)), None)
    np.testing.assert_allclose(ours["loglikelihoods"], lls, rtol=1e-4)
    assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]


@pytest.mark.slow
def test_smollm2_piqa_and_wikitext_match_hf(smollm2, tmp_path):
    """The real model on the real data: our evaluator, our adapter and lm-eval's hf model on the Hugging Face folder
    our SmolLM2 was loaded from."""
    from streamline_jax.loading import embedded_hf_folder

    shared_data("piqa", "valid.jsonl")
    folder = embedded_hf_folder("smollm2-135m")
    manager = TaskManager(include_path=str(write_offline_tasks(tmp_path / "tasks")))
    # WikiText's pages are scored in windows of 1024 tokens (not SmolLM2's 8192), to keep the PyTorch side short
    theirs_lm = HFLM(pretrained=str(folder), batch_size=8, device="cpu", dtype="float32", max_length=1024)
    ours, theirs, lls = our_piqa(smollm2, theirs_lm, manager, 10)
    np.testing.assert_allclose(ours["loglikelihoods"], lls, rtol=1e-4)
    assert ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]
    ours_lm = StreamlineLM(model=smollm2, batch_size=8, max_length=1024)
    got = simple_evaluate(model=ours_lm, tasks=["piqa_local", "wikitext_local"], task_manager=manager, limit=1)
    want = simple_evaluate(model=theirs_lm, tasks=["piqa_local", "wikitext_local"], task_manager=manager, limit=1)
    assert got["results"]["piqa_local"]["acc,none"] == want["results"]["piqa_local"]["acc,none"]
    assert got["results"]["wikitext_local"]["word_perplexity,none"] == pytest.approx(
        want["results"]["wikitext_local"]["word_perplexity,none"], rel=1e-4)
    prompts = ["The capital of France is", "Question: How do I boil an egg?\nAnswer:"]
    gen = requests("generate_until", [(p, {"until": ["\n"], "max_gen_toks": 16}) for p in prompts])
    assert ours_lm.generate_until(gen) == theirs_lm.generate_until(gen)


def test_acc_norm_counts_characters_and_acc_bytes_bytes():
    items = [tk.Item(("c",) * 2, (" é", " e"), ("é", "e"), 0, "y")]
    # per character both are 1 long: acc_norm picks 1 (-1 > -1.5); per byte "é" is 2: -1.5/2 > -1/1 picks 0
    scores = ev.score_items(items, [[-1.5, -1.0]])
    assert scores["acc_norm"] == 0.0 and scores["acc_bytes"] == 1.0


def test_bad_input(folders, offline_tasks):
    with pytest.raises(StreamlineLMError, match="unknown model argument.*trust_remote_code"):
        StreamlineLM(pretrained=str(folders["llama"]), trust_remote_code=True)
    with pytest.raises(StreamlineLMError, match="exactly one of pretrained"):
        StreamlineLM()
    with pytest.raises(StreamlineLMError, match="pretrained=/nonexistent: model not found"):
        StreamlineLM(pretrained="/nonexistent")
    with pytest.raises(StreamlineLMError, match="max_length=512 is longer than the model's context of 256"):
        StreamlineLM(pretrained=str(folders["llama"]), max_length=512)
    with pytest.raises(StreamlineLMError, match="mesh must be 'auto' or DxFxT"):
        StreamlineLM(pretrained=str(folders["llama"]), mesh="8")
    lm = StreamlineLM(pretrained=str(folders["llama"]), mesh="1x1x1")  # loaded onto a mesh, scored sharded
    assert lm.model.mesh is not None and lm.loglikelihood(requests("loglikelihood", PAIRS[:1]))[0][0] < 0
    with pytest.raises(StreamlineLMError, match="num_beams are not supported"):
        lm.generate_until(requests("generate_until", [("the cat", {"until": ["."], "num_beams": 4})]))
    with pytest.raises(StreamlineLMError, match="max_gen_toks=300 leaves no room"):
        lm.generate_until(requests("generate_until", [("the cat", {"max_gen_toks": 300})]))
    with pytest.raises(StreamlineLMError, match="continuation is 300 tokens, longer than the model's context"):
        lm.loglikelihood(requests("loglikelihood", [("the cat", " sat" * 300)]))


CHAT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Is the sky blue?"},
        {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "And the sun?"}]
# Gemma-style: a template that rejects the system role (lm-eval's hf then drops the system messages)
NO_SYSTEM_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                      "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                      "{% if add_generation_prompt %}<assistant>{% endif %}")


def with_tokenizer(src: Path, dst: Path, tokenizer) -> Path:
    """A copy of a tiny model folder with another tokenizer (only its text side matters to chat templates)."""
    shutil.copytree(src, dst)
    tokenizer.save_pretrained(str(dst))
    return dst


def test_chat_template_matches_hf(folders, tmp_path):
    """SmolLM2's chat template, and one that rejects the system role: the same text as lm-eval's hf for system,
    user and assistant turns, with the generation prompt and without (the last message left open)."""
    from transformers import AutoTokenizer

    from streamline_jax.loading import embedded_hf_folder

    smol = AutoTokenizer.from_pretrained(str(embedded_hf_folder("smollm2-135m")))
    assert "<|im_start|>" in smol.chat_template
    no_system = AutoTokenizer.from_pretrained(str(folders["llama"]))
    no_system.chat_template = NO_SYSTEM_TEMPLATE
    for name, tokenizer in (("smol", smol), ("no_system", no_system)):
        ours, theirs = both(with_tokenizer(folders["llama"], tmp_path / name, tokenizer))
        for history in (CHAT, CHAT[:3], CHAT[1:2]):
            for prompt in (True, False):
                got = ours.apply_chat_template(history, add_generation_prompt=prompt)
                assert got == theirs.apply_chat_template(history, add_generation_prompt=prompt)
                if name == "no_system":
                    assert "Answer in one word" not in got
        assert got == "<user>Is the sky blue?" if name == "no_system" else got.endswith("user\nIs the sky blue?")
    ours, theirs = both(folders["llama"])  # a tokenizer without a chat template: an error that says so, as in hf
    with pytest.raises(ValueError, match="chat_template is not set"):
        theirs.apply_chat_template(CHAT)
    with pytest.raises(StreamlineLMError, match="tokenizer has no chat template"):
        ours.apply_chat_template(CHAT)


def test_loglikelihoods_sharded_on_8_devices_equal_unsharded(folders):
    """The adapter on meshes over 8 simulated CPU devices (data, fsdp and tensor axes) scores as this process's
    single device does: log-likelihoods and rolling log-likelihoods within 1e-5 relative."""
    unsharded = StreamlineLM(pretrained=str(folders["llama"]), batch_size=4)
    want = [ll for ll, _ in unsharded.loglikelihood(requests("loglikelihood", PAIRS))]
    want_rolling = unsharded.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    out = run_python(f"""
        import json, jax
        from lm_eval.api.instance import Instance
        from streamline_jax.lm_eval import StreamlineLM

        assert len(jax.devices()) == 8
        pairs, texts = {PAIRS!r}, {TEXTS!r}
        res = {{}}
        for mesh in ("1x8x1", "2x2x2", "8x1x1"):
            lm = StreamlineLM(pretrained={str(folders["llama"])!r}, batch_size=4, mesh=mesh)
            assert len(jax.tree.leaves(lm.model.params)[0].sharding.device_set) == 8
            lls = lm.loglikelihood([Instance("loglikelihood", {{}}, p, i) for i, p in enumerate(pairs)])
            rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {{}}, (t,), i)
                                                for i, t in enumerate(texts)])
            res[mesh] = {{"ll": [ll for ll, _ in lls], "rolling": rolling}}
        print(json.dumps(res))
    """, timeout=400)
    results = json.loads(out.strip().splitlines()[-1])
    assert set(results) == {"1x8x1", "2x2x2", "8x1x1"}
    for mesh, got in results.items():
        np.testing.assert_allclose(got["ll"], want, rtol=1e-5, err_msg=mesh)
        np.testing.assert_allclose(got["rolling"], want_rolling, rtol=1e-5, err_msg=mesh)


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "streamline_jax.lm_eval", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_command_line(folders, offline_tasks, tmp_path):
    out = run_cli("--model", "streamline-jax", "--model_args", f"pretrained={folders['llama']}", "--tasks",
                  "piqa_local", "--include_path", str(offline_tasks), "--limit", "4", "--batch_size", "4",
                  "--output_path", str(tmp_path / "results"), "--log_samples", cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "piqa_local" in out.stdout and "acc_norm" in out.stdout
    assert list((tmp_path / "results").rglob("samples_piqa_local_*.jsonl"))
    bad = run_cli("--model", "streamline-jax", "--model_args", f"pretrained={folders['llama']},temperature=0.5",
                  "--tasks", "piqa_local", "--include_path", str(offline_tasks), "--limit", "2", cwd=ROOT)
    assert bad.returncode == 2 and "unknown model argument(s) for streamline-jax: temperature" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.pipeline
def test_pipeline_runs_harness_tasks_into_its_report(tiny_files, tmp_path, monkeypatch):
    """eval.harness_tasks: lm-eval's tasks on the dense and the pruned model, in report.json and report.md; the
    pruned model in the run's folder is what `pretrained=<run folder>` evaluates."""
    import json

    from streamline_jax import run as run_mod

    monkeypatch.setenv("STREAMLINE_JAX_DATA", str(tiny_files["shared"]))
    d, out = tiny_files["data"], tmp_path / "run"
    args = ["--model", str(tiny_files["llama"]), "--out", str(out), "--quiet", f"data.calibration={d / 'train.jsonl'}",
            "data.seq_len=32", "data.calib_chunks=4", "data.train_chunks=8", "data.batch_size=4", "data.valid=null",
            "score.sparsity=null", "score.num_layers=2", "eval.tasks=[]", "eval.limit=4", "export.hf=false",
            "eval.harness_tasks=[piqa_local]", "train.distill_steps=0"]
    assert run_mod.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    harness = report["harness"]
    assert set(harness) == {"dense", "pruned"} and harness["pruned"]["piqa_local"]["n"] == 4
    assert "## lm-evaluation-harness" in (out / "report.md").read_text()
    lm = StreamlineLM(pretrained=str(out))
    assert lm.model.config.depth == report["params"]["pruned_layers"]
    scores = simple_evaluate(model=lm, tasks=["piqa_local"], limit=4,
                             task_manager=TaskManager(include_path=str(write_offline_tasks(tmp_path / "t"))))
    assert scores["results"]["piqa_local"]["acc,none"] == harness["pruned"]["piqa_local"]["acc"]
    assert run_mod.main([*args[:3], str(tmp_path / "bad"), *args[4:-1], "eval.harness_tasks=[nosuch]"]) != 0
