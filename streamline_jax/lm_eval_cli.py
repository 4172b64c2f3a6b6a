"""`streamline-jax-lm-eval`: lm-eval's command line with streamline-jax registered (streamline_jax.lm_eval), or one
line saying how to install lm-evaluation-harness where that optional extra is missing."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    try:
        from .lm_eval import main as lm_eval_main
    except ImportError as e:  # the `lm-eval` extra is not installed
        print(f"error: {e}", file=sys.stderr)
        return 2
    return lm_eval_main(argv)
