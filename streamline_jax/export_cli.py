"""Export a pruned model (an Orbax model folder, or a run folder holding one in model/) as a stock Hugging Face
folder that `transformers.AutoModelForCausalLM.from_pretrained` loads with no custom code.

    streamline-jax-export runs/smollm2-135m /tmp/smollm2-pruned-hf

`ffn` blocks become decoder layers whose attention output projection is zero (the same function); an `mlp` block
has no stock form, and the script says so and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamline_jax import convert
from streamline_jax.loading import ORBAX_MARKER


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="Orbax model folder, or a run folder (its model/ is used)")
    p.add_argument("target", help="Hugging Face folder to write (atomically)")
    p.add_argument("--dtype", default=None, help="dtype of the exported weights (default: as saved)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    source = Path(args.source)
    if not (source / ORBAX_MARKER).exists() and (source / "model" / ORBAX_MARKER).exists():
        source = source / "model"
    if not (source / ORBAX_MARKER).exists():
        print(f"error: {args.source} is neither a streamline_jax model folder (no {ORBAX_MARKER}) nor a run folder "
              f"holding one in model/", file=sys.stderr)
        return 2
    # the Orbax -> Hugging Face conversion, which checks the block before loading any weights
    return convert.main([str(source), args.target, "--to", "hf", *(["--dtype", args.dtype] if args.dtype else []),
                         *(["--overwrite"] if args.overwrite else [])])


if __name__ == "__main__":
    sys.exit(main())
