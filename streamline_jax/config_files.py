"""Where the shipped settings files lie (package data, found through importlib.resources from any working directory,
installed from a wheel or run from a checkout), and what `--config` names: a YAML path or a shipped recipe."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# a wheel installs package data as plain files, so the folder is a real path (yaml and glob need one)
CONFIG_DIR = Path(str(resources.files("streamline_jax").joinpath("configs")))
RECIPE_DIR = CONFIG_DIR / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def config_path(spec: str) -> Path:
    """`--config`'s file: an existing path, else a shipped recipe's name (`paper`, `quick`), else a path under the
    former top-level configs/ folder (`configs/recipes/paper.yaml`), now shipped in the package. A name that is none
    of these is returned as it is, for read_yaml's "not found" error."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if (RECIPE_DIR / f"{spec}.yaml").is_file():
        return RECIPE_DIR / f"{spec}.yaml"
    if path.parts[:1] == ("configs",) and (CONFIG_DIR.joinpath(*path.parts[1:])).is_file():
        return CONFIG_DIR.joinpath(*path.parts[1:])
    return path
