"""Surgery against transformers: the same model with the same layers deleted from its layer list."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from streamline_jax import pruning as sj_prune
from streamline_jax.models import transformer
from streamline_jax.models.config import Segment
from streamline_jax.models.model import forward

from tiny import reference_pair

IDS = np.random.RandomState(1).randint(3, 128, (2, 10))
MASK = np.ones_like(IDS)
MASK[0, :3] = 0  # left padding


def hf_layers(ref):
    return ref.model.layers if hasattr(ref.model, "layers") else ref.model.decoder.layers


def hf_logits(ref, keep, zero_attention=(), layer_types=None):
    """transformers' logits with only the layers in `keep` (original numbers, in order; repeats allowed), and the
    attention output of the listed layers zeroed (which leaves exactly the FFN sub-block of a pre-norm layer).
    Gemma's layer_types are sliced the same way unless `layer_types` says otherwise."""
    ref = copy.deepcopy(ref)
    layers = hf_layers(ref)
    with torch.no_grad():
        for i in zero_attention:
            out = layers[i].self_attn.o_proj if hasattr(layers[i].self_attn, "o_proj") else layers[i].self_attn.out_proj
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for j, layer in enumerate(kept):  # transformers indexes its cache by the layer's position
        layer.self_attn.layer_idx = j
    if hasattr(ref.model, "layers"):
        ref.model.layers = kept
    else:
        ref.model.decoder.layers = kept
    ref.config.num_hidden_layers = len(keep)
    if getattr(ref.config, "layer_types", None):  # Gemma: each kept layer keeps its attention type
        ref.config.layer_types = layer_types or [ref.config.layer_types[i] for i in keep]
    kwargs = {"attention_mask": torch.tensor(MASK)}
    if hasattr(ref.model, "layers"):
        kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(MASK, 1) - 1, 0))
    with torch.no_grad():
        return ref(torch.tensor(IDS), **kwargs).logits.numpy()


def ours(model):
    logits = np.asarray(forward(model, IDS, MASK))
    return np.where(MASK[..., None] == 1, logits, 0)


def theirs(ref, keep, zero_attention=()):
    return np.where(MASK[..., None] == 1, hf_logits(ref, keep, zero_attention), 0)


def assert_close(a, b):
    np.testing.assert_allclose(a, b, atol=2e-5 * np.abs(b).max())


@pytest.fixture(scope="module", params=["llama", "opt", "gemma2", "gemma3"])
def pair(request):
    return reference_pair(request.param)


def test_none_equals_transformers_with_layers_deleted(pair):
    ref, model = pair
    pruned = sj_prune.prune(model, 2, 3, "none")
    assert pruned.config.layout == (Segment("layers", 3),) and pruned.config.depth == 3
    assert pruned.config.pruned_spans == ((2, 3, "none"),)
    assert_close(ours(pruned), theirs(ref, [0, 1, 5]))
    assert not np.allclose(ours(pruned), theirs(ref, [0, 1, 2, 5]))  # the comparison can tell


def test_layer_is_layer_start_put_back(pair):
    ref, model = pair
    pruned = sj_prune.prune(model, 1, 3, "layer")
    assert pruned.config.layout == (Segment("layers", 1), Segment("layer"), Segment("layers", 2))
    assert_close(ours(pruned), theirs(ref, [0, 1, 4, 5]))


def test_ffn_is_layer_start_without_attention(pair):
    ref, model = pair
    pruned = sj_prune.prune(model, 2, 2, "ffn")
    assert pruned.config.layout == (Segment("layers", 2), Segment("ffn"), Segment("layers", 2))
    assert_close(ours(pruned), theirs(ref, [0, 1, 2, 4, 5], zero_attention=[2]))


def test_mlp_starts_as_identity(pair):
    ref, model = pair
    pruned = sj_prune.prune(model, 3, 2, "mlp", mlp_width=40)
    assert pruned.config.layout == (Segment("layers", 3), Segment("mlp", width=40), Segment("layers", 1))
    block = pruned.params["segments"]["seg_1"]
    assert block["fc1"]["kernel"].shape == (64, 40) and np.abs(np.asarray(block["fc1"]["kernel"])).max() > 0
    assert_close(ours(pruned), theirs(ref, [0, 1, 2, 5]))
    default = sj_prune.prune(model, 3, 2, "mlp")
    assert default.config.layout[1].width == model.config.intermediate_size


def test_span_at_the_ends_omits_empty_stacks(pair):
    ref, model = pair
    first = sj_prune.prune(model, 0, 2, "layer")
    assert first.config.layout == (Segment("layer"), Segment("layers", 4))
    assert_close(ours(first), theirs(ref, [0, 2, 3, 4, 5]))
    last = sj_prune.prune(model, 4, 2, "none")
    assert last.config.layout == (Segment("layers", 4),)
    assert_close(ours(last), theirs(ref, [0, 1, 2, 3]))


def test_several_spans_in_original_numbers(pair):
    ref, model = pair
    once = sj_prune.prune(model, 1, 2, "layer")  # original 1, 2 -> a copy of 1
    twice = sj_prune.prune(once, 3, 2, "none")  # current 3, 4 = original 4, 5
    assert twice.config.pruned_spans == ((1, 2, "layer"), (4, 2, "none"))
    assert twice.config.layout == (Segment("layers", 1), Segment("layer"), Segment("layers", 1))
    assert_close(ours(twice), theirs(ref, [0, 1, 3]))
    thrice = sj_prune.prune(twice, 2, 1, "ffn")  # current 2 = original 3
    assert thrice.config.pruned_spans == ((1, 2, "layer"), (3, 1, "ffn"), (4, 2, "none"))
    assert_close(ours(thrice), theirs(ref, [0, 1, 3], zero_attention=[3]))
    # a span over an earlier block swallows it: its record is replaced by the wider one
    merged = sj_prune.prune(twice, 0, 2, "ffn")  # current 0, 1 = original 0 and the block over 1, 2
    assert merged.config.pruned_spans == ((0, 3, "ffn"), (4, 2, "none"))
    assert_close(ours(merged), theirs(ref, [0, 3], zero_attention=[0]))


def test_surgery_is_pure_and_keeps_the_other_layers_exactly(pair):
    _, model = pair
    before = {k: np.asarray(v) for k, v in model.params["segments"]["seg_0"]["self_attn"]["q_proj"].items()}
    config, params = sj_prune.prune_params(model.config, model.params, 1, 2, "layer")
    assert model.config.layout == (Segment("layers", 6),)
    np.testing.assert_array_equal(model.params["segments"]["seg_0"]["self_attn"]["q_proj"]["kernel"],
                                  before["kernel"])
    q = lambda seg: np.asarray(params["segments"][seg]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(q("seg_0")[0], before["kernel"][0])
    np.testing.assert_array_equal(q("seg_1"), before["kernel"][1])
    np.testing.assert_array_equal(q("seg_2"), before["kernel"][3:])
    per_layer = transformer.count_params(model.params["segments"]["seg_0"]) // 6
    assert transformer.count_params(params) == model.num_params - per_layer  # two out, one copy in
    assert transformer.count_params(params) == transformer.count_params(transformer.abstract_params(config))


def test_prune_layers_shortgpt(pair):
    ref, model = pair
    pruned = sj_prune.prune_layers(model, [4, 1, 2])
    assert pruned.config.pruned_spans == ((1, 2, "none"), (4, 1, "none"))
    assert_close(ours(pruned), theirs(ref, [0, 3, 5]))


def test_bad_spans():
    _, model = reference_pair("llama")
    with pytest.raises(ValueError, match="runs past the last layer"):
        sj_prune.prune(model, 4, 3)
    with pytest.raises(ValueError, match="start >= 0 and length >= 1"):
        sj_prune.prune(model, -1, 2)
    with pytest.raises(ValueError, match="start >= 0 and length >= 1"):
        sj_prune.prune(model, 1, 0)
    with pytest.raises(ValueError, match="unknown replacement"):
        sj_prune.prune(model, 1, 2, "attention")
    with pytest.raises(ValueError, match="leaves no layers"):
        sj_prune.prune(model, 0, 6, "none")
    with pytest.raises(ValueError, match="mlp_width"):
        sj_prune.prune(model, 1, 2, "layer", mlp_width=32)
    mlp = sj_prune.prune(model, 1, 2, "mlp", mlp_width=32)
    with pytest.raises(ValueError, match="cannot initialise a 'layer' block from layer 1"):
        sj_prune.prune(mlp, 1, 2, "layer")
    assert sj_prune.prune(model, 0, 6, "layer").config.layout == (Segment("layer"),)


def test_gemma_layer_types_follow_the_layers():
    """Gemma 3's sliding/full attention types (s s f s s f) follow each layer through pruning: a `layer` block
    from layer 1 stays sliding, layer 5 stays full. transformers with the same layers deleted and its layer_types
    sliced the same way agrees; with the types left in their old places it does not."""
    ref, model = reference_pair("gemma3")
    pruned = sj_prune.prune(model, 1, 2, "layer")
    assert pruned.config.layer_types == ("sliding_attention",) * 4 + ("full_attention",)
    assert_close(ours(pruned), theirs(ref, [0, 1, 3, 4, 5]))
    unsliced = ref.config.layer_types[:5]  # s s f s s: the types stay with the positions, not the layers
    wrong = np.where(MASK[..., None] == 1, hf_logits(ref, [0, 1, 3, 4, 5], layer_types=unsliced), 0)
    assert not np.allclose(ours(pruned), wrong, atol=1e-3)
    twice = sj_prune.prune(pruned, 3, 2, "none")  # drops current layers 3, 4 (original 4 and 5)
    assert twice.config.layer_types == ("sliding_attention",) * 3
    assert_close(ours(twice), theirs(ref, [0, 1, 3]))


def test_split_stack_lets_the_pruned_model_hold_the_dense_models_arrays(pair):
    """The run splits the dense stack at the span's ends, so the pruned model keeps the dense model's own arrays for
    the layers before and after the span (no second copy in memory), and both models compute what they did."""
    _, model = pair
    model = model.replace(params=jax.tree.map(jnp.copy, model.params))  # split_stack deletes the arrays it splits
    dense_logits, pruned_logits = ours(model), ours(sj_prune.prune(model, 2, 2, "layer"))
    dense = sj_prune.split_stack(model, [2, 4])
    assert dense.config.layout == (Segment("layers", 2),) * 3 and dense.config.is_dense
    pruned = sj_prune.prune(dense, 2, 2, "layer")
    assert_close(ours(dense), dense_logits)
    assert_close(ours(pruned), pruned_logits)
    for kept in ("seg_0", "seg_2"):
        leaves = [jax.tree.leaves(m.params["segments"][kept]) for m in (dense, pruned)]
        assert all(a is b for a, b in zip(*leaves))
    assert all(a.is_deleted() for a in jax.tree.leaves(model.params["segments"]["seg_0"]))
    # the block starts as a copy of the span's first layer, in buffers of its own (it trains; the span stays)
    span, block = (jax.tree.leaves(m.params["segments"]["seg_1"]) for m in (dense, pruned))
    assert not {a.unsafe_buffer_pointer() for a in block} & {a.unsafe_buffer_pointer() for a in span}
    assert all(np.array_equal(np.asarray(a[0]), np.asarray(b)) for a, b in zip(span, block))
