"""Convert a checkpoint between formats: a Hugging Face folder, hub id, .gguf file or embedded model name to an Orbax
model folder (read back by `streamline_jax.load`), and an Orbax model folder back to a Hugging Face folder.

    streamline-jax-convert smollm2-135m /tmp/smollm2-orbax                 # GGUF (embedded) -> Orbax
    streamline-jax-convert path/to/hf-folder /tmp/m-orbax --dtype bfloat16  # Hugging Face -> Orbax
    streamline-jax-convert /tmp/m-orbax /tmp/m-hf                           # Orbax -> Hugging Face
    streamline-jax-convert run/model m.gguf --to gguf --tokenizer src.gguf  # Orbax or HF -> GGUF (llama.cpp)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamline_jax import export, load
from streamline_jax.export_gguf import check_gguf_exportable, export_gguf
from streamline_jax.loading import ORBAX_MARKER, tokenizer_source


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="embedded name, Hugging Face folder or hub id, .gguf file, or Orbax model folder")
    p.add_argument("target", help="output folder (written atomically)")
    p.add_argument("--to", choices=("orbax", "hf", "gguf"), help="default: hf for an Orbax source, orbax otherwise")
    p.add_argument("--gguf-type", default="f16", help="GGUF tensor type: f32, f16, bf16, q8_0 (default f16)")
    p.add_argument("--tokenizer", help="GGUF, or Hugging Face folder, whose tokenizer the GGUF gets (default: the "
                                       "source's own)")
    p.add_argument("--dtype", default=None, help="parameter dtype (default: float32, or as saved for Orbax)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    is_orbax = (Path(args.source) / ORBAX_MARKER).exists()
    to = args.to or ("hf" if is_orbax else "orbax")
    try:
        if to == "hf" and is_orbax:  # fail on an `mlp` block before loading any weights
            export.check_hf_exportable(export.read_orbax_config(args.source))
        if to == "gguf" and is_orbax:
            check_gguf_exportable(export.read_orbax_config(args.source), args.gguf_type)
        model = export.load_orbax_model(args.source, args.dtype) if is_orbax else load(args.source,
                                                                                       args.dtype or "float32")
        if to == "gguf":
            out = export_gguf(model, args.target, args.gguf_type, args.tokenizer or tokenizer_source(args.source),
                              overwrite=args.overwrite)
        else:
            out = export.export_hf(model, args.target, args.overwrite) if to == "hf" else \
                export.save_orbax_model(model, args.target, args.overwrite)
    except (ValueError, OSError) as e:  # bad input, or a target the system refuses (permission, full disk)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.source} -> {out} ({to}, {model.config.depth} layers, {model.num_params:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
