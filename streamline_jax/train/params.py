"""Which parameters train: the pruned model's replacement blocks."""

from __future__ import annotations

import dataclasses

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
            blocks.append(Block(f"seg_{i}", seg, lo, hi - lo, layer))
        layer += seg.num_layers
    return blocks
