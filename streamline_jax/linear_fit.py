"""Training-free replacement blocks: a block's output projection fitted in closed form (ReplaceMe-style).

ReplaceMe (Shopkhoev et al., NeurIPS 2025, mts-ai/ReplaceMe) fits one D x D transform T by least squares on
calibration tokens, with the MLP output M of the layer *before* the span as input and (span output - span input + M)
as target, and folds T into that layer's down projection (no new parameters, start >= 1). We fit the same least
squares on the residual stream instead: the `linear` block is x + x W, with x the hidden state entering the span and
W = argmin sum over real tokens |x W - (y - x)|^2 + lam |W|^2, y the state leaving it. Why: the block stands alone
(any start, including 0; it composes with the other replacements and with training), our forward exposes the
residual stream but not the MLP output, and the ridge pulls W towards 0, i.e. the block towards the identity (the
`none` replacement), where ridge on ReplaceMe's T would pull it towards a map that drops the stream. Without ridge
the two fit the same span function up to which linear features they see.

Each token's squared error counts alike (`uniform`, ReplaceMe's) or relative to its target's mean square (`token`,
the pipeline's default): SmolLM2-135M's span 11-18 creates a massive activation at position 0 (its output there is
~100x the norm of the other tokens', `scripts/span_pair_stats.py`) that no linear map of the input makes without
wrecking the other tokens, and the uniform fit spends itself on that token (P1, `scripts/p1_protocol.py --rows
linear --fit-weighting uniform|token`).

The same solve initialises an `mlp` or `ffn` block (`init=linear`): its hidden activations (relu(fc1 x), or
silu(gate) * up of the normed x) are the features, its output projection (kernel, and bias through a constant
column) the solution, the rest of the block as initialised. A SwiGLU cannot start exactly at a linear map, so the
block starts at the best output map for its own features instead, and training goes on from there.

A `layer` block (a copy of the span's first layer, `init=linear`) is fitted the same way given its copied attention:
its output is h + f(h) W_down, h = x + attention(x), so W_down is the least-squares map from the MLP's features
f(h) to y - h, with h and f(h) read off the block's own forward (its output less its projection's output). Nothing
new is added: the exported model is the family's stock layer with other down-projection values. Where a norm
follows the projection (Gemma's post_feedforward_layernorm, post-norm OPT) the output is not linear in it and the fit
is refused. On SmolLM2 the fit wants `uniform` or `balanced` weighting: the span makes position 0's massive
activation, and a `token` fit that neglects it wrecks the attention of every later token (docs/results.md, issue
47). The ridge pulls towards the projection the block starts with: 0 for `linear` and `mlp` (the identity), the
copied layer's for `layer` and `ffn`, so a large ridge gives back the copy and a small one the plain fit.

Per calibration batch one jitted step (sharded like the batch on a mesh; XLA reduces the sums over devices) returns
X^T X, X^T R, sum |R|^2, the `none` replacement's sum |y - x|^2 and the token count, masked by the attention mask,
in float32; the host adds them into float64 sums. float64 because the residual stream of SmolLM2 carries massive
activations (norm ~23,000 at position 0 against ~200 elsewhere), so squares span ~1e4 and float32 sums over 10^5+
tokens would lose the small tokens' share; ReplaceMe accumulates in float64 for the same reason. Host memory is the
[F, F] and [F, D] sums, whatever the number of batches.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .backend import jit_for
from .models import transformer
from .models.config import ModelConfig, Segment
from .models.layers import Dense
from .models.model import Model
from .sharding import place_batch
from .train import Block, mse_token_weights, span_pairs, trainable_blocks

FITTABLE = ("linear", "mlp", "ffn", "layer")
WEIGHTINGS = ("uniform", "token", "balanced")
OUTPUT_PROJECTIONS = ("linear", "fc2", "down_proj")  # the Dense that ends each fittable block
DEFAULT_RIDGE = 1e-4


class FitError(ValueError):
    pass


def linear_in_projection(config: ModelConfig, segment: Segment) -> bool:
    """Whether the block's output is (what it computes without its output projection) + that projection's output,
    so that least squares over the projection is exact. Not where a norm follows the projection: Gemma's
    post_feedforward_layernorm, post-norm OPT's final_layer_norm after the residual."""
    if segment.kind not in ("layer", "ffn"):
        return True
    return not config.sandwich_norms and (config.family != "opt" or config.do_layer_norm_before)


def projection_io(config: ModelConfig, block: Block, block_params, x, attn, positions):
    """(block output, input of its output projection [..., F], that projection's output [..., D], its parameter
    path, whether it has a bias), read by intercepting the call of the block's last Dense. A `layer` block runs its
    attention on `x` with the mask `attn` and `positions` (`transformer.causal_masks`)."""
    seen = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if isinstance(module, Dense) and context.method_name == "__call__" and module.name in OUTPUT_PROJECTIONS:
            seen.update(x=args[0], y=out, path=tuple(module.scope.path), bias=module.use_bias)
        return out

    with nn.intercept_methods(capture):
        out, _, _ = transformer.run_segment(config, block.segment, block_params, x, attn, positions,
                                            first_layer=block.layer)
    return out, seen["x"], seen["y"], seen["path"], seen["bias"]


def _projection_site(config: ModelConfig, block: Block, block_params):
    """(parameter path, has bias) of the block's output projection, from a one-token trace."""
    ones = jnp.ones((1, 1), jnp.int32)
    attn, positions = transformer.causal_masks(config, ones)
    x = jnp.zeros((1, 1, config.hidden_size), jnp.float32)
    return projection_io(config, block, block_params, x, attn, positions)[3:]


def fit_sums_fn(dense_config: ModelConfig, pruned_config: ModelConfig, block: Block, weighting: str = "uniform"):
    """A jitted (dense params, block params, ids, mask) -> (X^T X [F', F'], X^T R [F', D], sum |R|^2,
    sum |y - x|^2, tokens), float32: X the block's projection input (plus a ones column when the projection has a
    bias), R = y - (the block's output less its projection's), y the span's output, x its input (so |y - x|^2 is
    the `none` replacement's error; R = y - x for the blocks whose rest is the identity).
    `weighting`: 1 a token (`uniform`), 1 / its target's mean square (`token`), or the MSE phase's own (`balanced`,
    `train.mse_token_weights`: the fit's optimum is the MSE phase's on the same batches). Under `uniform` the
    massive activation SmolLM2's span creates at position 0 (norm ~23,000) owns the fit."""
    def sums(dense_params, block_params, ids, mask):
        x_in, target = span_pairs(dense_config, dense_params, ids, mask, block.start, block.length)
        attn, positions = transformer.causal_masks(dense_config, mask)
        out, feats, projected, _, bias = projection_io(pruned_config, block, block_params, x_in, attn, positions)
        feats = feats.astype(jnp.float32)
        if bias:
            feats = jnp.concatenate([feats, jnp.ones_like(feats[..., :1])], axis=-1)
        real = mse_token_weights(target, mask, weighting)  # as the MSE phase weighs a batch's tokens
        if weighting != "balanced":  # but uniform and token weigh a token alike in every batch (ReplaceMe's sums)
            real = real * jnp.maximum(jnp.sum(mask > 0), 1).astype(jnp.float32)
        real = real[..., None]
        rest = out.astype(jnp.float32) - projected.astype(jnp.float32)
        residual = (target - rest) * jnp.sqrt(real)
        hi = jax.lax.Precision.HIGHEST
        xtx = jnp.einsum("btf,btg->fg", feats * real, feats, precision=hi)
        xtr = jnp.einsum("btf,btd->fd", feats * jnp.sqrt(real), residual, precision=hi)
        none = jnp.sum(jnp.square(target - x_in) * real)
        return xtx, xtr, jnp.sum(jnp.square(residual)), none, jnp.sum(mask > 0, dtype=jnp.int32)

    return jit_for(transformer.compute_dtype(dense_config), sums)


def ridge_solve(xtx, xtr, ridge: float, towards=None):
    """argmin_W |X W - R|^2 + lam |W - W0|^2 from the sums, lam = ridge * trace(X^T X) / F (relative, so one setting
    suits any model width and activation scale), W0 = `towards` (None: 0), in float64."""
    xtx, xtr = np.asarray(xtx, np.float64), np.asarray(xtr, np.float64)
    lam = ridge * np.trace(xtx) / len(xtx)
    singular = FitError(f"the calibration features are rank-deficient ({len(xtx)} features; fewer calibration "
                        f"tokens, or features that are zero or repeat) and ridge={ridge}: set a positive ridge or "
                        f"use more calibration tokens")
    if lam == 0:  # the sums come from float32 products: an eigenvalue below their rounding is no information
        eig = np.linalg.eigvalsh(xtx)
        if eig[0] <= eig[-1] * len(xtx) * np.finfo(np.float32).eps:
            raise singular
    try:
        rhs = xtr if towards is None or lam == 0 else xtr + lam * np.asarray(towards, np.float64)
        return np.linalg.solve(xtx + lam * np.eye(len(xtx)), rhs)
    except np.linalg.LinAlgError:
        raise singular from None


@dataclasses.dataclass(frozen=True)
class FitResult:
    """One fitted block: calibration tokens and its squared error to the span's output relative to the `none`
    replacement's |y - x|^2 (0 a perfect fit), after the fit and as the block started (1.0 for the blocks that start
    as the identity; a `layer` or `ffn` block: the copied layer's)."""

    key: str
    tokens: int
    relative_error: float
    start_error: float = 1.0


def _batch_arrays(batch):
    if isinstance(batch, dict):
        ids = np.asarray(batch["input_ids"], np.int32)
        mask = batch.get("attention_mask")
    else:
        ids, mask = batch
        ids = np.asarray(ids, np.int32)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask, np.int32)
    return ids, mask


def fit_block_sums(dense: Model, pruned: Model, block: Block, batches: Iterable, weighting: str = "uniform"):
    """The float64 sums (X^T X, X^T R, |R|^2, |y - x|^2, tokens) of `block` over `batches` (`fit_sums_fn`), one
    jitted step per batch."""
    step = fit_sums_fn(dense.config, pruned.config, block, weighting)
    block_params = pruned.params["segments"][block.key]
    total, pending = None, None
    for batch in batches:
        ids, mask = place_batch(dense.mesh, _batch_arrays(batch))
        out = step(dense.params, block_params, jnp.asarray(ids), jnp.asarray(mask))
        if pending is not None:  # the next step is queued before the host waits for this one
            total = _add(total, pending)
        pending = out
    if pending is None:
        raise FitError("no calibration batches: the linear fit needs calibration tokens")
    return _add(total, pending)


def _add(total, sums):
    host = [np.asarray(s, np.float64) for s in sums]
    return host if total is None else [a + b for a, b in zip(total, host)]


def _node(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, name, value):
    node = _node(tree, path)
    node[name] = jnp.asarray(value, node[name].dtype)


def _squared_error(w, xtx, xtr, r2):
    """|X W - R|^2 from the sums."""
    return r2 - 2 * np.sum(w * xtr) + np.sum(w * (xtx @ w))


def _fit_block(dense: Model, pruned: Model, block: Block, segments, batches, ridge, weighting) -> FitResult:
    """Fit `block`'s output projection, written into `segments` (the pruned model's, new containers)."""
    if not linear_in_projection(pruned.config, block.segment):
        raise FitError(f"the {block.segment.kind!r} block's output projection is followed by a norm in this "
                       f"{pruned.config.model_type} model, so no closed-form fit gives its best value")
    xtx, xtr, r2, none, tokens = fit_block_sums(dense, pruned, block, batches, weighting)
    if tokens <= 0:
        raise FitError("no real (unmasked) tokens in the calibration batches")
    path, bias = _projection_site(pruned.config, block, segments[block.key])
    node = _node(segments[block.key], path)
    start = np.asarray(node["kernel"], np.float64)
    if bias:
        start = np.concatenate([start, np.asarray(node["bias"], np.float64)[None]])
    w = ridge_solve(xtx, xtr, ridge, towards=start)  # a copied layer's projection, else 0 (blocks start there)
    _set(segments[block.key], path, "kernel", w[:-1] if bias else w)
    if bias:
        _set(segments[block.key], path, "bias", w[-1])
    scale = max(float(none), 1e-30)
    return FitResult(block.key, int(tokens), float(_squared_error(w, xtx, xtr, r2) / scale),
                     float(_squared_error(start, xtx, xtr, r2) / scale))


def fit_linear(dense: Model, pruned: Model, batches: Iterable, ridge: float = DEFAULT_RIDGE,
               weighting: str = "uniform") -> tuple[Model, list]:
    """Fit the output projection of every `linear`, `mlp`, `ffn` or `layer` block of `pruned` on the dense model's span
    (input, output) pairs over the calibration `batches` (a re-iterable when there are several blocks), each token
    weighted alike (`uniform`), by 1 / its target's mean square (`token`), or as the MSE phase weighs it
    (`balanced`); the ridge pulls towards the block's starting projection (`ridge_solve`).
    Returns (the model with those projections replaced, [FitResult per block])."""
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise FitError(f"ridge must be a non-negative number, got {ridge!r}")
    if weighting not in WEIGHTINGS:
        raise FitError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    if not dense.config.is_dense:
        raise FitError("the linear fit reads the span's pairs from the dense model; got a pruned one as `dense`")
    blocks = [b for b in trainable_blocks(pruned.config) if b.segment.kind in FITTABLE]
    if not blocks:
        kinds = sorted({s.kind for s in pruned.config.layout})
        raise FitError(f"the pruned model has no {'/'.join(FITTABLE)} block to fit (its segments: {kinds})")
    segments = jax.tree.map(lambda a: a, dict(pruned.params["segments"]))  # new containers, same arrays
    results = [_fit_block(dense, pruned, block, segments, batches, ridge, weighting) for block in blocks]
    out = pruned.replace(params={**pruned.params, "segments": segments}, mesh=None)
    if pruned.mesh is not None:
        from .loading import place_on_mesh

        out = place_on_mesh(out, pruned.mesh)
    return out, results
