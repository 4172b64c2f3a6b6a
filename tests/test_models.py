"""Layer-by-layer parity of our Flax Llama and OPT with transformers' PyTorch models, tiny random configs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from reference import params_from_torch, torch_forward, torch_model
from streamline_jax.models import transformer
from streamline_jax.models.config import Segment, UnsupportedArchitectureError, from_hf_config, to_hf_config
from streamline_jax.models.layers import layer_norm, rms_norm
from tiny import CONFIGS, make_batch

PADDING = {"no_padding": None, "right_padding": "right", "left_padding": "left"}


def final_hidden(config, params, h_last):
    """Apply what transformers applies to its last hidden state: the final norm (and OPT-350m's project_out)."""
    x = jnp.asarray(h_last)
    if config.has_final_norm:
        norm = rms_norm(config, jnp.float32, None) if config.family == "llama" else layer_norm(
            config.layer_norm_eps, jnp.float32, None)
        x = norm.apply({"params": params["final_norm"]}, x)
    if config.has_projections:
        x = x @ params["project_out"]["kernel"]
    return np.asarray(x)


@pytest.mark.parametrize("padding", PADDING.values(), ids=PADDING.keys())
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_hidden_states_match_transformers(name, padding):
    config = CONFIGS[name]
    ref_model = torch_model(config)
    params = params_from_torch(config, ref_model)
    ids, mask = make_batch(padding=padding)
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    ref_logits, ref_hidden = torch_forward(ref_model, ids, mask, positions)
    out = transformer.apply(config, params, ids, mask, collect_hidden=True)
    real = mask.astype(bool)
    logits = np.asarray(out["logits"])
    assert logits.shape == ref_logits.shape
    assert rel_err(logits[real], ref_logits[real]) <= 1e-4
    hidden = np.asarray(out["hidden"])
    assert hidden.shape[0] == config.num_layers + 1 == len(ref_hidden)
    for i in range(config.num_layers):
        assert rel_err(hidden[i][real], ref_hidden[i][real]) <= 1e-4, f"hidden state {i}"
    # transformers' last entry has the final norm applied; ours is the raw output of the last layer.
    assert rel_err(final_hidden(config, params, hidden[-1])[real], ref_hidden[-1][real]) <= 1e-4
    if config.has_final_norm:
        assert rel_err(hidden[-1][real], ref_hidden[-1][real]) > 1e-2


@pytest.mark.parametrize("name", ["llama_gqa_tied", "mistral_sliding_window", "opt_125m_style"])
def test_long_sequences_match_transformers(name):
    """Past CAUSAL_BLOCK tokens, queries go in blocks that see only the keys up to their end: still transformers'
    logits (right padding included)."""
    config = CONFIGS[name].replace(max_position_embeddings=512)
    ref_model = torch_model(config)
    params = params_from_torch(config, ref_model)
    ids, mask = make_batch(length=300, padding="right")
    ref_logits, _ = torch_forward(ref_model, ids, mask, np.maximum(mask.cumsum(-1) - 1, 0))
    logits = np.asarray(transformer.apply(config, params, ids, mask)["logits"])
    real = mask.astype(bool)
    assert rel_err(logits[real], ref_logits[real]) <= 1e-4


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_blocked_causal_attention_equals_dense_in_values_and_gradients(softcap):
    """The blocked loop's own backward (flash attention's, from the saved logsumexp) against autodiff through the
    dense softmax: window, key padding and Gemma 2's score cap included."""
    from streamline_jax.models import layers

    b, t, h, kv, d = 2, 150, 6, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k, v = (jax.random.normal(key, (b, t, kv, d)) for key in keys[1:])
    key_mask = jnp.ones((b, t), jnp.int32).at[1, 140:].set(0)
    mask = transformer.attention_mask_matrix(key_mask, jnp.arange(t)[None], sliding_window=100)
    assert t > layers.CAUSAL_BLOCK

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, mask)))

    blocked = jax.value_and_grad(lambda *a: loss(lambda *x: layers.attend(*x, causal=True, softcap=softcap), *a),
                                 argnums=(0, 1, 2))
    dense = jax.value_and_grad(lambda *a: loss(lambda *x: layers.attend(*x, softcap=softcap), *a), argnums=(0, 1, 2))
    (vb, gb), (vd, gd) = blocked(q, k, v), dense(q, k, v)
    np.testing.assert_allclose(vb, vd, rtol=1e-5)
    for x, y in zip(gb, gd):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_blocked_attention_without_its_own_backward_is_autodiff_through_the_blocked_forward():
    """The setting scripts/bench_attention.py compares against: the same values, gradients within float32 rounding
    of flash attention's backward, and a program without the custom backward's logsumexp."""
    from streamline_jax.models import layers

    b, t, h, kv, d = 1, 40, 4, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k, v = (jax.random.normal(key, (b, t, kv, d)) for key in keys[1:])
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    def loss(own):
        return lambda *a: jnp.sum(jnp.sin(layers.attend_causal_blocks(*a, mask, own_backward=own)))

    grads = {own: jax.value_and_grad(loss(own), argnums=(0, 1, 2))(q, k, v) for own in (True, False)}
    np.testing.assert_allclose(grads[True][0], grads[False][0], rtol=1e-6)
    for x, y in zip(grads[True][1], grads[False][1]):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_low_precision_backward_off_is_jaxs_own_transpose(monkeypatch):
    """The setting scripts/bench_backward.py compares against: with it off, a bf16 product's backward multiplies the
    float32 cotangent in float32 (JAX's transpose); on (the default), every backward product takes bf16 inputs."""
    from streamline_jax.models import layers

    a, b = (jnp.ones(s, jnp.bfloat16) for s in ((3, 4), (4, 5)))

    def dot_operands():
        grad = jax.jit(jax.grad(lambda a, b: jnp.sum(layers.product("ij,jk->ik", a, b)), (0, 1)))
        return [line.rsplit(":", 1)[1].split("->")[0] for line in grad.lower(a, b).as_text().splitlines()
                if "stablehlo.dot_general" in line]

    assert dot_operands() and all("f32" not in o for o in dot_operands())
    monkeypatch.setattr(layers, "LOW_PRECISION_BACKWARD", False)
    assert any("f32" in o for o in dot_operands())


def test_low_precision_backward_makes_only_the_gradients_asked_for():
    """A frozen weight's gradient is not made: differentiating a bf16 product in one input compiles one backward
    product (two in all), in both inputs two; the gradients are JAX's own transpose's, within bf16 rounding."""
    from streamline_jax.models import layers

    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    a, b = jax.random.normal(keys[0], (3, 4), jnp.bfloat16), jax.random.normal(keys[1], (4, 5), jnp.float32)

    def grad(argnums):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(layers.product("ij,jk->ik", a, b))), argnums))

    def dots(argnums):
        return grad(argnums).lower(a, b.astype(jnp.bfloat16)).as_text().count("stablehlo.dot_general")

    assert (dots(0), dots(1), dots((0, 1))) == (2, 2, 3)
    b16 = b.astype(jnp.bfloat16)
    (da, db), da_only, db_only = grad((0, 1))(a, b16), grad(0)(a, b16), grad(1)(a, b16)
    assert (da.dtype, db.dtype) == (jnp.bfloat16, jnp.bfloat16)
    np.testing.assert_array_equal(da, da_only)
    np.testing.assert_array_equal(db, db_only)
    exact = jax.grad(lambda a, b: jnp.sum(jnp.sin(a.astype(jnp.float32) @ b)), (0, 1))(a, b16.astype(jnp.float32))
    np.testing.assert_allclose(da.astype(jnp.float32), exact[0], rtol=0.05, atol=0.05)
    np.testing.assert_allclose(db.astype(jnp.float32), exact[1], rtol=0.05, atol=0.05)
    # mixed inputs: each gradient in its own input's dtype
    mixed = jax.grad(lambda a, b: jnp.sum(layers.product("ij,jk->ik", a, b)), 0)(a, b)
    assert mixed.dtype == jnp.bfloat16


def test_blocked_causal_attention_keeps_fully_masked_rows_finite():
    """Left padding leaves the first queries no key to see; the blocked softmax, normalised after the value
    product, must still give finite outputs and gradients there (the rows are ignored, but a NaN would spread)."""
    from streamline_jax.models import layers

    b, t, h, kv, d = 1, layers.CAUSAL_BLOCK + 20, 4, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k, v = (jax.random.normal(key, (b, t, kv, d)) for key in keys[1:])
    key_mask = jnp.ones((b, t), jnp.int32).at[0, :5].set(0)
    mask = transformer.attention_mask_matrix(key_mask, jnp.arange(t)[None])
    assert not bool(mask[0, 0].any())
    out, grads = jax.value_and_grad(lambda *a: jnp.sum(layers.attend(*a, mask, causal=True) ** 2),
                                    argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(float(out)) and all(bool(jnp.isfinite(g).all()) for g in grads)


def test_attention_is_traced_for_the_target_platform():
    """CPU traces the blocked loop; an ahead-of-time TPU plan traced on this CPU host gets the dense attention. The
    platform is the config's, so a jit keyed on the config traces each platform's attention, not the first's."""
    from streamline_jax.models import layers

    t = layers.CAUSAL_BLOCK + 8
    q = k = v = jnp.zeros((1, t, 2, 4))
    mask = jnp.ones((1, t, t), bool)
    traced = lambda platform: str(jax.make_jaxpr(lambda *a: layers.attend(*a, causal=True, platform=platform))(
        q, k, v, mask))
    assert "scan" in traced(None) or "while" in traced(None)
    assert "scan" not in traced("tpu") and "while" not in traced("tpu")
    config = CONFIGS["llama_gqa_tied"].replace(max_position_embeddings=t)
    params = transformer.init_params(config, jax.random.PRNGKey(0))
    ids = jnp.zeros((1, t), jnp.int32)
    apply = jax.jit(lambda c, p, i: transformer.apply(c, p, i, jnp.ones_like(i))["logits"], static_argnums=0)
    lowered = [apply.lower(config.replace(attention_platform=platform), params, ids).as_text()
               for platform in (None, "tpu", None)]
    assert lowered[0] != lowered[1] and lowered[0] == lowered[2]


@pytest.mark.parametrize("name", ["llama_gqa_tied", "mistral_sliding_window", "opt_350m_style"])
def test_packed_rows_give_each_sequence_its_own_logits(name):
    """Several sequences packed into one row (segment ids) see only themselves, with positions from 0."""
    config = CONFIGS[name].replace(max_position_embeddings=512)
    params = transformer.init_params(config, jax.random.PRNGKey(2))
    rng = np.random.default_rng(3)
    lengths = [[90, 130, 60, 20], [7, 200]]  # rows of 300 slots, longer than one attention block
    ids = np.zeros((2, 300), np.int32)
    segments = np.zeros((2, 300), np.int32)
    for row, parts in enumerate(lengths):
        offset = 0
        for seg, n in enumerate(parts, start=1):
            ids[row, offset:offset + n] = rng.integers(3, 128, n)
            segments[row, offset:offset + n] = seg
            offset += n
    packed = np.asarray(transformer.apply(config, params, ids, segment_ids=segments)["logits"])
    for row, parts in enumerate(lengths):
        offset = 0
        for n in parts:
            alone = np.asarray(transformer.apply(config, params, ids[row:row + 1, offset:offset + n])["logits"])[0]
            assert rel_err(packed[row, offset:offset + n], alone) <= 1e-5
            offset += n
    with pytest.raises(ValueError, match="segment_ids"):
        transformer.apply(config, params, ids, np.ones_like(ids), segment_ids=segments)


@pytest.mark.parametrize("name", ["llama_gqa_tied", "mistral_sliding_window", "gemma3", "opt_350m_style"])
def test_branches_after_a_shared_packed_prefix_get_the_logits_of_their_whole_sequences(name):
    """Packed rows where several sequences share a prefix read once (shared_prefix_ids): each branch sees the prefix
    and itself, at the positions it has in its whole sequence. Rows of 300 slots (blocked attention), branches
    further from their prefix in slots than the 4-token sliding window is in positions."""
    config = CONFIGS[name].replace(max_position_embeddings=512)
    params = transformer.init_params(config, jax.random.PRNGKey(2))
    rng = np.random.default_rng(4)
    units = [[(40, [30, 25, 60]), (0, [50])], [(3, [1, 2, 9]), (120, [10, 20])]]  # (prefix, branch lengths)
    ids, segments, prefixes, positions = (np.zeros((2, 300), np.int32) for _ in range(4))
    wholes = []  # (row, slots of the branch, the whole sequence)
    for row, row_units in enumerate(units):
        offset, seg = 0, 0
        for a, branches in row_units:
            prefix = rng.integers(3, 128, a)
            prefix_seg = 0
            if a:
                seg += 1
                prefix_seg = seg
                ids[row, offset:offset + a], segments[row, offset:offset + a] = prefix, seg
                positions[row, offset:offset + a] = np.arange(a)
                offset += a
            for n in branches:
                seg += 1
                branch = rng.integers(3, 128, n)
                ids[row, offset:offset + n], segments[row, offset:offset + n] = branch, seg
                prefixes[row, offset:offset + n], positions[row, offset:offset + n] = prefix_seg, np.arange(a, a + n)
                wholes.append((row, slice(offset, offset + n), np.concatenate([prefix, branch])))
                offset += n
    packed = np.asarray(transformer.apply(config, params, ids, positions=positions, segment_ids=segments,
                                          shared_prefix_ids=prefixes)["logits"])
    for row, slots, whole in wholes:
        alone = np.asarray(transformer.apply(config, params, whole[None])["logits"])[0]
        n = slots.stop - slots.start
        assert rel_err(packed[row, slots], alone[len(whole) - n:]) <= 1e-5
    with pytest.raises(ValueError, match="explicit positions"):
        transformer.apply(config, params, ids, segment_ids=segments, shared_prefix_ids=prefixes)
    with pytest.raises(ValueError, match="go with segment_ids"):
        transformer.apply(config, params, ids, positions=positions, shared_prefix_ids=prefixes)


def test_padding_does_not_change_real_tokens():
    """A left- or right-padded sequence gives the logits it has on its own."""
    config = CONFIGS["llama_gqa_tied"]
    params = transformer.init_params(config, jax.random.PRNGKey(1))
    for padding in ("left", "right"):
        ids, mask = make_batch(padding=padding)
        out = np.asarray(transformer.apply(config, params, ids, mask)["logits"])
        for row in range(ids.shape[0]):
            keep = mask[row].astype(bool)
            alone = np.asarray(transformer.apply(config, params, ids[row:row + 1, keep])["logits"])[0]
            np.testing.assert_allclose(out[row, keep], alone, rtol=1e-4, atol=1e-4)


def test_remat_gives_same_logits_and_gradients():
    config = CONFIGS["llama_bias"]
    params = transformer.init_params(config, jax.random.PRNGKey(2))
    ids, mask = make_batch(padding="right")

    def loss(p, remat):
        return transformer.apply(config, p, ids, mask, remat=remat)["logits"].sum()

    g0 = jax.grad(loss)(params, False)
    g1 = jax.grad(loss)(params, True)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert rel_err(a, b) <= 1e-5


def test_params_are_stacked_on_a_leading_layer_axis_with_logical_names():
    config = CONFIGS["llama_bias"]
    shapes = transformer.abstract_params(config)
    axes = transformer.param_axes(config)
    q = shapes["segments"]["seg_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (3, 64, 4, 16)
    assert axes["segments"]["seg_0"]["self_attn"]["q_proj"]["kernel"] == ("layers", "embed", "heads", "head_dim")
    assert axes["embed_tokens"] == ("vocab", "embed")
    for leaf_axes, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)), jax.tree.leaves(shapes)):
        assert len(leaf_axes) == len(leaf.shape)


def test_layouts_with_replacement_blocks_run():
    config = CONFIGS["opt_350m_style"].replace(
        num_layers=4, layout=(Segment("layers", 1), Segment("layer"), Segment("ffn"), Segment("mlp", width=8)))
    params = transformer.init_params(config)
    out = transformer.apply(config, params, np.ones((2, 5), np.int32), collect_hidden=True)
    assert out["hidden"].shape == (5, 2, 5, 64)
    assert out["logits"].shape == (2, 5, 128)


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match=r"gpt2.*llama.*mistral.*opt"):
        from_hf_config({"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8})


def test_unsupported_rope_scaling_is_refused():
    hf = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
          "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    with pytest.raises(UnsupportedArchitectureError, match="yarn"):
        from_hf_config(hf)


@pytest.mark.parametrize("name", CONFIGS)
def test_bf16_compute_stays_within_bf16_rounding_of_transformers_float32(name):
    """compute_dtype=bfloat16: dot inputs rounded to bf16 (8 significant bits, so each operand is off by up to
    2^-9 ~ 0.2% relative), accumulated in float32; norms, softmax and the residual stream in float32. Through three
    layers and the head that is a few tenths of a percent of the largest logit (0.2-0.6% measured); 2% allows for a
    dozen such roundings adding up, while a wrong product or a float32 path that never ran would fail (bf16 must
    differ from float32 by more than float32's own 1e-4)."""
    config = CONFIGS[name]
    ref_model = torch_model(config)
    params = params_from_torch(config, ref_model)
    ids, mask = make_batch(padding="left")
    ref_logits, _ = torch_forward(ref_model, ids, mask, np.maximum(mask.cumsum(-1) - 1, 0))
    out = transformer.apply(config.replace(compute_dtype="bfloat16"), params, ids, mask, collect_hidden=True)
    real = mask.astype(bool)
    err = rel_err(np.asarray(out["logits"])[real], ref_logits[real])
    assert 1e-4 < err <= 2e-2, err
    assert out["hidden"].dtype == jnp.float32 and out["logits"].dtype == jnp.float32  # residual stream stays float32
    caches = transformer.init_caches(config.replace(compute_dtype="bfloat16"), 1, 8)
    assert all(c.dtype == jnp.bfloat16 for c in jax.tree.leaves(caches))
    # the weights are not cast: a bf16 compute config runs the float32 parameters as they are
    assert transformer.abstract_params(config.replace(compute_dtype="bfloat16")) == transformer.abstract_params(config)


def test_bf16_backward_products_take_bf16_inputs_and_match_float32_gradients():
    """The backward pass's products run at the bf16 rate too: every dot in the gradient program of a bf16-compute
    loss takes bf16 operands (JAX's own transpose of a float32-accumulating product multiplies the float32 cotangent
    in float32), and the gradients stay within bf16 rounding of the float32 program's. The float32 program is
    unchanged: its gradient equals plain einsum's bitwise."""
    from streamline_jax.models.layers import product

    config = CONFIGS["llama_gqa_tied"]
    params = transformer.init_params(config, jax.random.PRNGKey(0))
    ids, mask = make_batch(padding="left")

    def loss(p, cfg):
        return jnp.mean(transformer.apply(cfg, p, ids, mask)["logits"] ** 2)

    bf16 = config.replace(compute_dtype="bfloat16")
    text = jax.jit(jax.grad(loss), static_argnums=1).lower(params, bf16).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    operands = [line.rsplit(":", 1)[1].split("->")[0] for line in dots]
    assert dots and all("f32" not in o and "bf16" in o for o in operands), operands
    g16, g32 = jax.grad(loss)(params, bf16), jax.grad(loss)(params, config)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
        assert rel_err(np.asarray(a), np.asarray(b)) < 3e-2
    a, b = (jnp.asarray(np.random.default_rng(0).normal(size=s), jnp.float32) for s in ((3, 4), (4, 5)))
    ours = jax.grad(lambda a, b: jnp.sum(product("ij,jk->ik", a, b) ** 2), (0, 1))(a, b)
    plain = jax.grad(lambda a, b: jnp.sum(jnp.einsum("ij,jk->ik", a, b, preferred_element_type=jnp.float32) ** 2),
                     (0, 1))(a, b)
    assert all(np.array_equal(x, y) for x, y in zip(ours, plain))


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith("opt")] + ["opt_350m_style"])
def test_hf_config_round_trip_names_the_architecture_class(name):
    config = CONFIGS[name]
    hf = to_hf_config(config)
    assert from_hf_config(hf) == config
    # transformers builds the class the config names from it
    ref = torch_model(config)
    assert type(ref).__name__ == hf["architectures"][0]


def test_qwen_projection_flags_and_qk_norm_axis():
    qwen2 = transformer.abstract_params(CONFIGS["qwen2_tied"])["segments"]["seg_0"]["self_attn"]
    assert {"bias"} <= set(qwen2["q_proj"]) and "bias" not in qwen2["o_proj"]
    axes = transformer.param_axes(CONFIGS["qwen3"])["segments"]["seg_0"]["self_attn"]
    assert axes["q_norm"]["scale"] == axes["k_norm"]["scale"] == ("layers", "head_dim")
    assert transformer.abstract_params(CONFIGS["qwen3"])["segments"]["seg_0"]["self_attn"]["q_norm"]["scale"].shape \
        == (3, 24)


@pytest.mark.parametrize("model_type,key,value", [("qwen2", "use_sliding_window", True),
                                                  ("qwen3", "layer_types", ["sliding_attention"]),
                                                  ("qwen2", "hidden_act", "gelu"),
                                                  ("gemma2", "hidden_activation", "gelu"),
                                                  ("gemma2", "rope_scaling", {"rope_type": "linear", "factor": 2.0}),
                                                  ("gemma3_text", "rope_scaling", {"rope_type": "yarn", "factor": 8.0}),
                                                  # transformers keeps it in Gemma 3's config but never applies it
                                                  ("gemma3_text", "attn_logit_softcapping", 50.0),
                                                  ("gemma3_text", "use_bidirectional_attention", True),
                                                  ("gemma3_text", "layer_types", ["chunked_attention"] * 4)])
def test_unimplemented_config_flags_are_named(model_type, key, value):
    name = {"qwen2": "qwen2_tied", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3"}[model_type]
    hf = {**to_hf_config(CONFIGS[name]), key: value}
    if key == "rope_scaling":  # transformers 5's key would otherwise win
        hf.pop("rope_parameters")
    with pytest.raises(UnsupportedArchitectureError, match=f"{model_type}: config {key}[.=]"):
        from_hf_config(hf)


@pytest.mark.parametrize("name,flag", [("qwen2_tied", {"attention_bias": True}), ("qwen3", {"qkv_bias": True}),
                                       ("llama_gqa_tied", {"qk_norm": True}), ("qwen2_tied", {"sliding_window": 8}),
                                       ("llama_gqa_tied", {"final_logit_softcap": 30.0}),
                                       ("qwen3", {"norm_offset": 1.0}), ("gemma3", {"attn_logit_softcap": 50.0})])
def test_a_flag_the_architecture_cannot_hold_is_not_exported(name, flag):
    config = CONFIGS[name].replace(**flag)
    with pytest.raises(UnsupportedArchitectureError, match=f"has no config for {next(iter(flag))}="):
        to_hf_config(config)


GEMMA_PRESET_HF = {  # the published config.json values, in transformers 4's keys
    "gemma-2-2b": dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                       num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       max_position_embeddings=8192, rope_theta=10000.0, sliding_window=4096,
                       query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma-3-1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                       num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                       max_position_embeddings=32768, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       rope_scaling=None, sliding_window=512, sliding_window_pattern=6, query_pre_attn_scalar=256),
    "gemma-3-4b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                       num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                       max_position_embeddings=131072, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                       rope_scaling={"factor": 8.0, "rope_type": "linear"}, sliding_window=1024,
                       sliding_window_pattern=6, query_pre_attn_scalar=256),
}


@pytest.mark.parametrize("name", GEMMA_PRESET_HF)
def test_gemma_configs_of_transformers_4_and_5_read_as_the_preset(name):
    """Gemma's published config.json (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern) and
    the same config as transformers 5 writes it (layer_types, rope_parameters per layer type) give the preset."""
    import transformers

    from streamline_jax.models.presets import preset

    v4 = dict(GEMMA_PRESET_HF[name], rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", bos_token_id=2,
              eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    assert from_hf_config(v4, dtype="bfloat16") == preset(name)
    cls = transformers.Gemma2Config if v4["model_type"] == "gemma2" else transformers.Gemma3TextConfig
    v5 = cls(**{k: v for k, v in v4.items() if k != "model_type"}).to_dict()
    assert "layer_types" in v5 and "rope_parameters" in v5
    assert from_hf_config(v5, dtype="bfloat16") == preset(name)


GEMMA_FLAGS = {
    "gemma2": [{"layer_types": ("full_attention",) * 3}, {"attn_logit_softcap": None}, {"final_logit_softcap": None},
               {"query_pre_attn_scalar": None}, {"embed_scale": False}, {"norm_offset": 0.0},
               {"activation": "silu"}],
    "gemma3": [{"layer_types": ("full_attention",) * 4}, {"local_rope_theta": None}, {"rope_scaling": None},
               {"query_pre_attn_scalar": None}, {"local_window": 2}],
}


@pytest.mark.parametrize("name", GEMMA_FLAGS)
def test_gemma_flags_each_change_the_logits(name):
    """The parity test above could fail: each Gemma flag, turned off, moves the logits far past its tolerance."""
    config = CONFIGS[name]
    params = params_from_torch(config, torch_model(config))
    ids, mask = make_batch(padding="left")
    real = mask.astype(bool)
    base = np.asarray(transformer.apply(config, params, ids, mask)["logits"])[real]
    for change in GEMMA_FLAGS[name]:
        logits = np.asarray(transformer.apply(config.replace(**change), params, ids, mask)["logits"])[real]
        assert rel_err(logits, base) > 1e-3, change


def test_gemma_config_round_trips_at_every_depth_pruning_leaves():
    """Pruned down to full-attention layers only, a Gemma config still exports (its window kept) and reads back."""
    from streamline_jax.pruning import prune_config

    config = prune_config(prune_config(CONFIGS["gemma2"], 0, 1, "none"), 1, 1, "none")
    assert config.layer_types == ("full_attention",)
    hf = to_hf_config(config)
    assert hf["layer_types"] == ["full_attention"] and hf["num_hidden_layers"] == 1
    assert from_hf_config(hf) == config.replace(layout=(), pruned_spans=())
