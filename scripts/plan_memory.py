"""`python scripts/plan_memory.py` as before; the command is now `python -m streamline_jax.plan_memory`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, as before the move
from streamline_jax.plan_memory import *  # noqa: E402,F403 (main and the helpers the tests call)
from streamline_jax.plan_memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
