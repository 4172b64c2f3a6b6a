"""Which parameters train: the pruned model's replacement blocks, parameter paths, the trained / frozen split of a
parameter tree, and the `trainable` / `freeze` patterns resolved to paths."""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import jax

from ..models import transformer
from ..models.config import ModelConfig, Segment


@dataclasses.dataclass(frozen=True)
class Block:
    """The one replacement block being trained: its segment key in the pruned model, and the dense span it replaces."""

    key: str
    segment: Segment
    start: int  # first original layer of the span
    length: int
    layer: int = 0  # its index in the pruned stack (where `layer_types` has its attention type)


def trainable_blocks(pruned: ModelConfig) -> list[Block]:
    from ..pruning import original_ranges

    ranges = original_ranges(pruned)
    blocks, layer = [], 0
    for i, seg in enumerate(pruned.layout):
        if seg.kind != "layers":
            lo, hi = ranges[layer]
            blocks.append(Block(transformer.segment_key(i), seg, lo, hi - lo, layer))
        layer += seg.num_layers
    return blocks


def chosen_block(pruned_config: ModelConfig, block_key) -> Block:
    blocks = trainable_blocks(pruned_config)
    if block_key is not None:
        blocks = [b for b in blocks if b.key == block_key]
    if not blocks:
        raise ValueError("the pruned model has no replacement block to train (replacement 'none'?)")
    if len(blocks) > 1:
        raise ValueError(f"the pruned model has {len(blocks)} replacement blocks ({[b.key for b in blocks]}); "
                         f"pass block_key= to train one at a time")
    return blocks[0]


def param_path(key_path) -> str:
    """A parameter's '/'-joined path ("segments/seg_1/mlp/down_proj/kernel")."""
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def split_params(params, is_trained):
    """(trained, frozen): two nested dicts holding the leaves whose path `is_trained` says, and the rest."""
    def split(tree, prefix):
        trained, frozen = {}, {}
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if isinstance(value, Mapping):
                t, f = split(value, path + "/")
                trained.update({key: t} if t else {})
                frozen.update({key: f} if f else {})
            elif is_trained(path):
                trained[key] = value
            else:
                frozen[key] = value
        return trained, frozen

    return split(params, "")


def merge_params(a, b):
    """The union of two trees of nested dicts that `split_params` made."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge_params(out[key], value) if key in out else value
    return out


# What `freeze=("attention",)` stands for: the attention projections and the norm before them (Llama's
# input_layernorm; OPT's self_attn_layer_norm matches self_attn).
ATTENTION_HALF = ("self_attn", "input_layernorm")


def freeze_labels(block_params, freeze: Sequence[str]):
    """"train" / "frozen" for each of the block's parameters: frozen where a `freeze` regex matches its path
    ("self_attn/q_proj/kernel"). `attention` stands for the block's attention half, and for nothing in a block that
    has no attention (`ffn`, `mlp`), so one setting serves every replacement. None when nothing is frozen. Every
    other pattern must match, and something must train."""
    if isinstance(freeze, str):
        freeze = (freeze,)
    paths = [param_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(block_params)]
    freeze = [pattern for name in freeze for pattern in (
        [r for r in ATTENTION_HALF if any(re.search(r, p) for p in paths)] if name == "attention" else [name])]
    if not freeze:
        return None
    regexes = []
    for pattern in freeze:
        try:
            regexes.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"freeze pattern {pattern!r} is not a regular expression: {e}") from None
    for regex in regexes:
        if not any(regex.search(p) for p in paths):
            raise ValueError(f"freeze pattern {regex.pattern!r} matches none of the block's parameters: "
                             f"{sorted(paths)}")
    labels = jax.tree_util.tree_map_with_path(
        lambda k, _: "frozen" if any(r.search(param_path(k)) for r in regexes) else "train", block_params)
    if "train" not in jax.tree.leaves(labels):
        raise ValueError(f"freeze {list(freeze)} freezes every parameter of the block; nothing would train")
    return labels


# Keywords of `trainable` besides regexes: `block` (the replacement block's parameters) and the decoder layers on
# either side of it, which name no segment key, so one setting holds wherever the span falls; unlike a regex, a side
# with no layers (a span at the model's start or end) selects nothing rather than failing.
SIDES_OF_BLOCK = ("before_block", "after_block")


def _pattern_regexes(pattern: str, pruned_params, block: Block) -> list[str]:
    """The regexes a `trainable` pattern stands for: a keyword's (none for a side without layers), or itself."""
    if pattern == "block":
        return [re.escape(f"segments/{block.key}/") + ".*"]
    if pattern not in SIDES_OF_BLOCK:
        return [pattern]
    here = transformer.segment_index(block.key)
    before = pattern == "before_block"
    return [re.escape(f"segments/{k}/") + ".*" for k in pruned_params["segments"]
            if (transformer.segment_index(k) < here if before else transformer.segment_index(k) > here)]


def trained_paths(pruned_params, block: Block, trainable: Sequence[str] = ("block",),
                  freeze: Sequence[str] = ()) -> list[str]:
    """The '/'-joined paths of the parameters that train: those a `trainable` regex matches in full over the pruned
    model's paths (e.g. "segments/seg_2/.*mlp.*"; `block` stands for the replacement block's parameters,
    `before_block` and `after_block` for every decoder layer before or after it), less the block's parameters a
    `freeze` pattern matches (see `freeze_labels`). A stacked segment keeps all its layers in one leaf, so patterns
    select whole leaves: every layer of a segment, or none. Every regex must match something."""
    if isinstance(trainable, str):
        trainable = (trainable,)
    if not trainable:
        raise ValueError("trainable is empty: nothing would train (the default is ['block'])")
    paths = [param_path(k) for k, _ in jax.tree_util.tree_leaves_with_path(pruned_params)]
    selected = set()
    for pattern in trainable:
        for expression in _pattern_regexes(pattern, pruned_params, block):
            try:
                regex = re.compile(expression)
            except re.error as e:
                raise ValueError(f"trainable pattern {pattern!r} is not a regular expression: {e}") from None
            hits = {p for p in paths if regex.fullmatch(p)}
            if not hits:
                groups = sorted({"/".join(p.split("/")[:3]) for p in paths})
                raise ValueError(f"trainable pattern {pattern!r} matches none of the pruned model's parameter paths "
                                 f"(it must match a whole path); they start with {groups}")
            selected |= hits
    labels = freeze_labels(pruned_params["segments"][block.key], freeze)
    if labels is not None:
        selected -= {f"segments/{block.key}/{param_path(k)}"
                     for k, label in jax.tree_util.tree_leaves_with_path(labels) if label == "frozen"}
    if not selected:
        raise ValueError(f"trainable {list(trainable)} less freeze {list(freeze)} leaves nothing to train")
    return sorted(selected)
