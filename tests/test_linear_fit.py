"""The training-free `linear` replacement and `init=linear`: the closed-form fit against numpy's least squares on the
same (input, output) pairs, masks included, on one device and on a mesh; the fitted model runs everywhere a model
runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamline_jax import export, linear_fit, load
from streamline_jax.evaluation import score_sequences
from streamline_jax.generation import generate
from streamline_jax.models import transformer
from streamline_jax.models.model import Model, forward, hidden_states
from streamline_jax.pruning import prune

from helpers import padded_calibration as calibration, run_python, small_model as tiny_model

START, LENGTH = 2, 3


def span_pairs_numpy(model, batches):
    """(X, Y) [tokens, D] in float64: the dense model's hidden states entering and leaving the span, real tokens
    only, from the plain forward."""
    xs, ys = [], []
    for b in batches:
        h = np.asarray(hidden_states(model, b["input_ids"], b["attention_mask"]), np.float64)
        real = b["attention_mask"].astype(bool)
        xs.append(h[START][real])
        ys.append(h[START + LENGTH][real])
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_linear_fit_equals_numpy_least_squares(ridge):
    dense, batches = tiny_model(), calibration()
    fitted, [result] = linear_fit.fit_linear(dense, prune(dense, START, LENGTH, "linear"), batches, ridge=ridge)
    x, y = span_pairs_numpy(dense, batches)
    assert result.tokens == len(x) == sum(int(b["attention_mask"].sum()) for b in batches)
    if ridge == 0:
        expected = np.linalg.lstsq(x, y - x, rcond=None)[0]
    else:
        lam = ridge * np.trace(x.T @ x) / x.shape[1]
        expected = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ (y - x))
    got = np.asarray(fitted.params["segments"]["seg_1"]["linear"]["kernel"], np.float64)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    residual = x @ expected - (y - x)
    assert result.relative_error == pytest.approx(np.sum(residual ** 2) / np.sum((y - x) ** 2), rel=1e-3, abs=1e-6)
    # the fitted model computes the block as x + x W between the kept layers
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    h = np.asarray(hidden_states(fitted, ids, mask), np.float64)
    real = mask.astype(bool)
    np.testing.assert_allclose(h[START + 1][real], h[START][real] @ (np.eye(len(got)) + got), rtol=1e-4, atol=1e-4)


def test_token_weighted_fit_equals_numpy_weighted_least_squares():
    """`token`: each token's squared error divided by its target's mean square."""
    dense, batches = tiny_model(), calibration()
    fitted, [result] = linear_fit.fit_linear(dense, prune(dense, START, LENGTH, "linear"), batches, ridge=0.0,
                                             weighting="token")
    x, y = span_pairs_numpy(dense, batches)
    w = 1 / (np.mean(y ** 2, axis=1, keepdims=True) + 1e-6)
    expected = np.linalg.lstsq(x * np.sqrt(w), (y - x) * np.sqrt(w), rcond=None)[0]
    got = np.asarray(fitted.params["segments"]["seg_1"]["linear"]["kernel"], np.float64)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    uniform = np.linalg.lstsq(x, y - x, rcond=None)[0]
    assert np.abs(got - uniform).max() > 1e-2 * np.abs(expected).max()  # the weights matter
    residual = (x @ expected - (y - x)) ** 2 * w
    assert result.relative_error == pytest.approx(residual.sum() / ((y - x) ** 2 * w).sum(), rel=1e-3)
    with pytest.raises(linear_fit.FitError, match="weighting"):
        linear_fit.fit_linear(dense, prune(dense, START, LENGTH, "linear"), batches, weighting="relative")


def test_init_linear_fits_the_mlp_output_projection_with_its_bias():
    dense, batches = tiny_model(), calibration()
    pruned = prune(dense, START, LENGTH, "mlp", mlp_width=40)
    fitted, [result] = linear_fit.fit_linear(dense, pruned, batches, ridge=0.0)
    x, y = span_pairs_numpy(dense, batches)
    fc1 = jax.tree.map(lambda a: np.asarray(a, np.float64), pruned.params["segments"]["seg_1"]["fc1"])
    feats = np.maximum(x @ fc1["kernel"] + fc1["bias"], 0)
    feats = np.concatenate([feats, np.ones((len(feats), 1))], 1)
    expected = np.linalg.lstsq(feats, y - x, rcond=None)[0]
    fc2 = fitted.params["segments"]["seg_1"]["fc2"]
    scale = np.abs(expected).max()
    assert np.abs(np.asarray(fc2["kernel"]) - expected[:-1]).max() < 1e-3 * scale
    assert np.abs(np.asarray(fc2["bias"]) - expected[-1]).max() < 1e-3 * scale
    # fc1 as initialised; the fit beats the identity start
    np.testing.assert_array_equal(np.asarray(fitted.params["segments"]["seg_1"]["fc1"]["kernel"]),
                                  np.asarray(pruned.params["segments"]["seg_1"]["fc1"]["kernel"]))
    assert result.relative_error < 1.0


def test_init_linear_ffn_keeps_the_gate_and_up_projections_and_lowers_the_error():
    dense, batches = tiny_model(), calibration()
    pruned = prune(dense, START, LENGTH, "ffn")
    fitted, [result] = linear_fit.fit_linear(dense, pruned, batches, ridge=0.0)
    before, after = pruned.params["segments"]["seg_1"]["mlp"], fitted.params["segments"]["seg_1"]["mlp"]
    for name in ("gate_proj", "up_proj"):
        np.testing.assert_array_equal(np.asarray(after[name]["kernel"]), np.asarray(before[name]["kernel"]))
    assert not np.array_equal(np.asarray(after["down_proj"]["kernel"]), np.asarray(before["down_proj"]["kernel"]))
    x, y = span_pairs_numpy(dense, batches)

    def error(model):  # the block's squared error on the calibration tokens, from the plain forward
        outs = [np.asarray(hidden_states(model, b["input_ids"], b["attention_mask"]), np.float64)[START + 1]
                [b["attention_mask"].astype(bool)] for b in batches]
        return np.sum((np.concatenate(outs) - y) ** 2)

    # least squares over the down projection beats the span's first layer's own one, by the reported amount
    assert error(fitted) < error(pruned)
    assert error(fitted) / np.sum((y - x) ** 2) == pytest.approx(result.relative_error, rel=1e-3)


def test_fit_refuses_bad_input():
    dense, batches = tiny_model(), calibration(1)
    with pytest.raises(linear_fit.FitError, match="no linear/mlp/ffn/layer block"):
        linear_fit.fit_linear(dense, prune(dense, START, LENGTH, "none"), batches)
    with pytest.raises(linear_fit.FitError, match="ridge"):
        linear_fit.fit_linear(dense, prune(dense, START, LENGTH, "linear"), batches, ridge=-1)
    with pytest.raises(linear_fit.FitError, match="no calibration batches"):
        linear_fit.fit_linear(dense, prune(dense, START, LENGTH, "linear"), [])
    with pytest.raises(linear_fit.FitError, match="dense"):
        pruned = prune(dense, START, LENGTH, "linear")
        linear_fit.fit_linear(pruned, pruned, batches)


def test_linear_model_generates_scores_saves_and_refuses_hf_export(tmp_path):
    dense = tiny_model()
    model, _ = linear_fit.fit_linear(dense, prune(dense, START, LENGTH, "linear"), calibration())
    prompts = [[5, 17, 42], [9, 8, 7, 6, 5, 4, 30, 31]]
    out = generate(model, prompts, 6, output_logits=True, eos_token_id=())
    for prompt, new, logits in zip(prompts, out.tokens, out.logits):
        full = np.asarray(forward(model, [prompt + new[:-1]]))[0, len(prompt) - 1:]
        np.testing.assert_allclose(logits, full, rtol=1e-4, atol=1e-4)
    seq = np.asarray(prompts[1])
    [logprobs], _ = score_sequences(model, [seq], [len(seq) - 1])
    expected = jax.nn.log_softmax(forward(model, [seq[:-1]])[0], -1)[jnp.arange(len(seq) - 1), seq[1:]]
    np.testing.assert_allclose(logprobs, np.asarray(expected), rtol=1e-4, atol=1e-4)
    folder = export.save_orbax_model(model, tmp_path / "model")
    back = load(folder)
    assert back.config == model.config and [s.kind for s in back.config.layout] == ["layers", "linear", "layers"]
    np.testing.assert_array_equal(np.asarray(forward(back, [seq])), np.asarray(forward(model, [seq])))
    with pytest.raises(export.ExportError, match="linear.*Orbax"):
        export.export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


ON_MESH = r"""
import sys, numpy as np, jax
sys.path.insert(0, "tests")
assert jax.device_count() == 8
from streamline_jax import linear_fit, make_mesh
from streamline_jax.loading import place_on_mesh
from streamline_jax.pruning import prune
from helpers import padded_calibration as calibration, small_model as tiny_model
START, LENGTH = SPAN
dense = place_on_mesh(tiny_model(), make_mesh(data=2, fsdp=4))
fitted, [result] = linear_fit.fit_linear(dense, prune(dense, START, LENGTH, "linear"), calibration(batch=8))
kernel = fitted.params["segments"]["seg_1"]["linear"]["kernel"]
assert len(kernel.sharding.device_set) == 8, kernel.sharding
np.save(sys.argv[1] if len(sys.argv) > 1 else "/dev/null", np.asarray(kernel))
print("tokens", result.tokens)
"""


def test_fit_on_an_8_device_mesh_equals_one_device(tmp_path):
    path = tmp_path / "kernel.npy"
    out = run_python(ON_MESH.replace('sys.argv[1] if len(sys.argv) > 1 else "/dev/null"', repr(str(path)))
                     .replace("SPAN", repr((START, LENGTH))))
    dense = tiny_model()
    fitted, [result] = linear_fit.fit_linear(dense, prune(dense, START, LENGTH, "linear"), calibration(batch=8))
    assert f"tokens {result.tokens}" in out
    expected = np.asarray(fitted.params["segments"]["seg_1"]["linear"]["kernel"])
    np.testing.assert_allclose(np.load(path), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# --------------------------------------------------------------------------------------------------------------
# init=linear on a `layer` block: the copied layer's down projection, given its copied attention

PROJECTIONS = {"llama": ("mlp", "down_proj"), "opt": ("fc2",)}


def projection(model, path):
    """The block's output projection as one [F (+1 for a bias), D] matrix, float64."""
    node = model.params["segments"]["seg_1"]
    for k in path:
        node = node[k]
    w = np.asarray(node["kernel"], np.float64)
    return np.concatenate([w, np.asarray(node["bias"], np.float64)[None]]) if "bias" in node else w


def block_out(model, batches, path, w):
    """The block's output on the real calibration tokens from the plain forward, with its output projection set to
    `w` (as `projection` gives it)."""
    segments = jax.tree.map(lambda a: a, dict(model.params["segments"]))
    node = segments["seg_1"]
    for k in path:
        node = node[k]
    has_bias = "bias" in node
    node["kernel"] = jnp.asarray(w[:-1] if has_bias else w, node["kernel"].dtype)
    if has_bias:
        node["bias"] = jnp.asarray(w[-1], node["bias"].dtype)
    probe = model.replace(params={**model.params, "segments": segments})
    return np.concatenate([np.asarray(hidden_states(probe, b["input_ids"], b["attention_mask"]), np.float64)
                           [START + 1][b["attention_mask"].astype(bool)] for b in batches])


def layer_features(model, batches, path):
    """(the block's output with a zero projection, the projection's input features [tokens, F (+ ones)]) read off
    the plain forward: the output is affine in the projection, so one-hot rows expose the features a width at a
    time."""
    width, d = projection(model, path).shape
    rest = block_out(model, batches, path, np.zeros((width, d)))
    cols = []
    for lo in range(0, width, d):
        n = min(d, width - lo)
        probe = np.zeros((width, d))
        probe[lo + np.arange(n), np.arange(n)] = 1
        cols.append((block_out(model, batches, path, probe) - rest)[:, :n])
    return rest, np.concatenate(cols, axis=1)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_init_linear_layer_equals_numpy_least_squares_given_the_copied_attention(family):
    from tiny import SMALL_OPT, dense as random_dense

    dense, path = (tiny_model() if family == "llama" else random_dense(SMALL_OPT)), PROJECTIONS[family]
    batches = calibration()
    pruned = prune(dense, START, LENGTH, "layer")
    fitted, [result] = linear_fit.fit_linear(dense, pruned, batches, ridge=0.0)
    x, y = span_pairs_numpy(dense, batches)
    rest, feats = layer_features(pruned, batches, path)
    expected = np.linalg.lstsq(feats, y - rest, rcond=None)[0]
    got = projection(fitted, path)
    assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    # everything but the projection is the copied layer's (its attention above all)
    before, after = (jax.tree_util.tree_leaves_with_path(m.params["segments"]["seg_1"]) for m in (pruned, fitted))
    changed = {tuple(k.key for k in p[:-1]) for (p, a), (_, b) in zip(before, after) if not np.array_equal(a, b)}
    assert changed == {path}
    # the plain forward's error to the span's output: below the copied layer's, as reported (relative to `none`'s)
    none = np.sum((y - x) ** 2)
    error = np.sum((block_out(fitted, batches, path, got) - y) ** 2)
    copied = np.sum((block_out(pruned, batches, path, projection(pruned, path)) - y) ** 2)
    assert error < copied
    assert result.relative_error == pytest.approx(error / none, rel=1e-3)
    assert result.start_error == pytest.approx(copied / none, rel=1e-3)


def balanced_weights(batches, y):
    """Each real token's weight in the `balanced` MSE (`train.masked_mse`), batch by batch, in numpy."""
    out, lo = [], 0
    for b in batches:
        n = int(b["attention_mask"].sum())
        size = np.mean(y[lo:lo + n] ** 2, axis=-1)
        out.append(0.5 * (1 / (size.sum() + 1e-6) + 1 / (max(n, 1) * (size + 1e-6))))
        lo += n
    return np.concatenate(out)


def test_balanced_layer_fit_is_the_mse_phase_optimum_and_its_ridge_pulls_towards_the_copy():
    """`balanced`: weighted least squares with the MSE phase's own token weights, the ridge pulling towards the
    copied projection: numpy's solve of the same problem; at ridge 0 the training loss (the balanced MSE summed over
    the batches) has no gradient left in the projection; a huge ridge gives back the copy."""
    from streamline_jax.train.losses import masked_mse

    dense, path, batches = tiny_model(), PROJECTIONS["llama"], calibration()
    pruned = prune(dense, START, LENGTH, "layer")
    _, y = span_pairs_numpy(dense, batches)
    rest, feats = layer_features(pruned, batches, path)
    w = balanced_weights(batches, y)[:, None]
    copy = projection(pruned, path)
    xtx = feats.T @ (w * feats)
    for ridge in (0.0, 0.3):
        fitted, [result] = linear_fit.fit_linear(dense, pruned, batches, ridge=ridge, weighting="balanced")
        lam = ridge * np.trace(xtx) / len(xtx)
        expected = np.linalg.solve(xtx + lam * np.eye(len(xtx)), feats.T @ (w * (y - rest)) + lam * copy)
        got = projection(fitted, path)
        assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
    assert np.abs(got - copy).max() > 1e-3 * np.abs(copy).max()  # ridge 0.3 moved it

    def loss(kernel):  # the MSE phase's loss on the calibration batches, as a function of the projection
        out = jnp.asarray(rest) + jnp.asarray(feats, jnp.float32) @ kernel
        total, lo = 0.0, 0
        for b in batches:
            n = int(b["attention_mask"].sum())
            total += masked_mse(out[None, lo:lo + n], jnp.asarray(y[lo:lo + n])[None], jnp.ones((1, n)), "balanced")
            lo += n
        return total

    fitted, _ = linear_fit.fit_linear(dense, pruned, batches, ridge=0.0, weighting="balanced")
    at_fit, at_copy = (jax.grad(loss)(jnp.asarray(k, jnp.float32)) for k in (projection(fitted, path), copy))
    assert float(jnp.abs(at_fit).max()) < 1e-2 * float(jnp.abs(at_copy).max())
    assert float(loss(jnp.asarray(projection(fitted, path), jnp.float32))) < float(loss(jnp.asarray(copy, jnp.float32)))
    held, _ = linear_fit.fit_linear(dense, pruned, batches, ridge=1e6, weighting="balanced")
    assert np.abs(projection(held, path) - copy).max() < 1e-3 * np.abs(copy).max()


def test_layer_fit_on_fewer_tokens_than_features_needs_the_ridge():
    """7 real tokens against the layer's 48 MLP features: X^T X is singular. Without a ridge: one clear error
    (numpy's solve would return noise, not raise); with one: a finite fit that beats the copied layer there."""
    dense, batches = tiny_model(), calibration(num_batches=1, batch=2, seq=8)
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 7
    pruned = prune(dense, START, LENGTH, "layer")
    with pytest.raises(linear_fit.FitError, match="rank-deficient.*ridge=0.0"):
        linear_fit.fit_linear(dense, pruned, batches, ridge=0.0)
    fitted, [result] = linear_fit.fit_linear(dense, pruned, batches, ridge=1e-3)
    assert np.isfinite(projection(fitted, PROJECTIONS["llama"])).all()
    assert result.relative_error < result.start_error


def test_layer_fit_refuses_a_norm_after_the_projection():
    """Gemma norms the MLP's output before the residual: its down projection has no closed-form optimum."""
    from tiny import CONFIGS

    gemma = CONFIGS["gemma2"]
    dense = Model(gemma, transformer.init_params(gemma, jax.random.PRNGKey(0)))
    with pytest.raises(linear_fit.FitError, match="'layer' block's output projection is followed by a norm"):
        linear_fit.fit_linear(dense, prune(dense, 0, 2, "layer"), calibration(1, vocab=gemma.vocab_size))


def test_fitted_layer_block_exports_as_a_stock_layer(tmp_path):
    """The fit changes the values of a weight the layer already has, so the Hugging Face folder loads in
    transformers' own class with our logits, and the GGUF reads back as the same model."""
    import torch
    import transformers

    from reference import params_from_torch, torch_model
    from streamline_jax.export_gguf import export_gguf
    from tiny import CONFIGS, train_tokenizer, vocab_gguf

    config = CONFIGS["llama_bias"].replace(num_layers=6, layout=())  # a bias on the down projection too
    dense = Model(config, params_from_torch(config, torch_model(config)), train_tokenizer())
    pruned = prune(dense, 1, 3, "layer")
    fitted, [result] = linear_fit.fit_linear(dense, pruned, calibration(vocab=config.vocab_size))
    assert result.relative_error < result.start_error
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 12))
    ours = np.asarray(forward(fitted, ids))
    assert np.abs(ours - np.asarray(forward(pruned, ids))).max() > 1e-3  # the fit shows in the logits
    folder = export.export_hf(fitted, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert type(hf).__module__.startswith("transformers.models.") and hf.config.num_hidden_layers == 4
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-5
    path = export_gguf(fitted, tmp_path / "m.gguf", "f32", tokenizer_source=vocab_gguf(tmp_path / "vocab.gguf",
                                                                                      config.vocab_size))
    np.testing.assert_allclose(np.asarray(forward(load(path), ids)), ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())
