"""Where the data folder (`{data}` in the settings) comes from, in this order, the step taken named in the log:

1. the settings: a path that does not start with `{data}` is read as it is (never looked up here);
2. `$STREAMLINE_JAX_DATA`: a folder in the local layout (LAYOUT);
3. `../shared/data` beside a checkout (how the tests and CI run offline);
4. the Hugging Face hub through `datasets` (HUB), each part needed written once in the local layout under
   `~/.cache/streamline_jax/data` ($STREAMLINE_JAX_CACHE/data) and read from there afterwards.

`python -m streamline_jax.data download DIR` (`streamline-jax-data download DIR`) writes the whole local layout from
the hub, for machines without it (pod workers, offline boxes): then set STREAMLINE_JAX_DATA=DIR there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

ENV = "STREAMLINE_JAX_DATA"
PLACEHOLDER = "{data}"
# the local layout: each part's files, relative to the data folder
LAYOUT = {
    "corpus": ("corpus/train.jsonl", "corpus/valid.jsonl"),
    "wikitext-2": ("wikitext-2-raw/wiki.test.raw",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
}
VALID_EVERY = 10  # corpus: every 10th document goes to valid.jsonl, as in ../shared/data
CORPUS_DOCS = 22_000  # ~20k training documents (~20M tokens, ~80 MB): the defaults' 8.9M tokens without a repeat

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HubSource:
    """A part's `datasets.load_dataset` arguments, and the licence to name beside it."""

    path: str
    name: str | None
    split: str
    licence: str
    streaming: bool = False

    def load(self):
        import datasets

        return datasets.load_dataset(self.path, self.name, split=self.split, streaming=self.streaming)


HUB = {
    # the standard perplexity text, the raw (untokenized) variant, test split
    "wikitext-2": HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "CC BY-SA 3.0"),
    # PIQA validation as parquet (no loading script): the repository lm-evaluation-harness's `piqa` task reads
    "piqa": HubSource("baber/piqa", None, "validation", "AFL-3.0"),
    # calibration and training text when none is given: FineWeb-Edu's 10B-token sample, English web pages filtered
    # for educational value; parquet, streamed (only the documents read are fetched), ODC-By 1.0
    "corpus": HubSource("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "ODC-By 1.0", streaming=True),
}


class DataUnavailable(ValueError):
    """The data a run needs is in none of the places looked in; the message names the ways to provide it."""


def ways_to_provide() -> str:
    return (f"set ${ENV} to a folder in the local layout (`streamline-jax-data download DIR` writes one on a machine "
            f"that reaches the Hugging Face hub), give the files in the settings (data.calibration=FILE "
            f"data.valid=FILE, eval.tasks=[] or eval.perplexity_text=FILE), put the folder at ../shared/data beside a "
            f"checkout, or run where the hub is reachable")


# ---------------------------------------------------------------------------------------------------------------
# The order


def checkout_data_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def hub_copy_dir() -> Path:
    from .loading import cache_dir

    return cache_dir() / "data"


def data_folder() -> tuple[Path, str]:
    """(folder, step): $STREAMLINE_JAX_DATA where set, else ../shared/data beside a checkout where it exists, else
    the hub's copy in the cache (complete or not: `provide` fills it)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser(), f"${ENV}"
    if checkout_data_dir().is_dir():
        return checkout_data_dir(), "../shared/data beside the checkout"
    return hub_copy_dir(), "the Hugging Face hub"


def parts_of(specs) -> tuple[list[str], list[str]]:
    """(parts of LAYOUT, other relative paths) that the `{data}/...` strings among `specs` name."""
    files = {f: part for part, fs in LAYOUT.items() for f in fs}
    parts, others = [], []
    for spec in specs:
        if isinstance(spec, str) and spec.startswith(PLACEHOLDER):
            rel = spec[len(PLACEHOLDER):].lstrip("/")
            part = files.get(rel)
            if part is None:
                others.append(rel)
            elif part not in parts:
                parts.append(part)
    return parts, others


def provide(specs) -> Path | None:
    """The data folder holding every `{data}/...` file among `specs`, from the first step of the order that has
    it (downloading the missing parts into the cache when the order reaches the hub), named in the log. None when
    no spec needs the data folder. Raises DataUnavailable, naming the ways to provide the data."""
    parts, others = parts_of(specs)
    if not parts and not others:
        return None
    folder, step = data_folder()
    missing = [f"{PLACEHOLDER}/{rel}" for rel in [f for p in parts for f in LAYOUT[p]] + others
               if not (folder / rel).is_file()]
    if missing and step == "the Hugging Face hub" and not others:
        fetch = [p for p in parts if any(not (folder / f).is_file() for f in LAYOUT[p])]
        log.info("data: %s from the Hugging Face hub into %s", ", ".join(fetch), folder)
        try:
            download(folder, fetch)
        except Exception as e:  # offline, unreachable, refused: the ways to provide the data instead
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataUnavailable(f"no data for {', '.join(missing)}: not in ${ENV} (unset) or ../shared/data, "
                                  f"and the Hugging Face hub failed ({type(e).__name__}: {first[:200]}). Provide "
                                  f"it: {ways_to_provide()}") from None
    elif missing:
        raise DataUnavailable(f"data file(s) not found in {folder} ({step}): {', '.join(missing)}. Provide them: "
                              f"{ways_to_provide()}")
    log.info("data: %s (%s)", folder, step)
    return folder


# ---------------------------------------------------------------------------------------------------------------
# The local layout written from the hub


def write_wikitext(rows, folder: Path) -> None:
    """The raw test text with the blank lines dropped (each row is one line of wiki.test.raw, newline included)."""
    with open(folder / LAYOUT["wikitext-2"][0], "w", encoding="utf-8") as f:
        f.writelines(r["text"] if r["text"].endswith("\n") else r["text"] + "\n" for r in rows if r["text"].strip())


def write_piqa(rows, folder: Path) -> None:
    items, labels = LAYOUT["piqa"]
    with open(folder / items, "w", encoding="utf-8") as fi, open(folder / labels, "w") as fl:
        for r in rows:
            fi.write(json.dumps({k: r[k] for k in ("goal", "sol1", "sol2")}, ensure_ascii=False) + "\n")
            fl.write(f"{int(r['label'])}\n")


def write_corpus(rows, folder: Path, docs: int = CORPUS_DOCS) -> None:
    train, valid = LAYOUT["corpus"]
    with open(folder / train, "w", encoding="utf-8") as ft, open(folder / valid, "w", encoding="utf-8") as fv:
        n = 0
        for r in rows:
            if not r["text"].strip():
                continue
            (fv if n % VALID_EVERY == VALID_EVERY - 1 else ft).write(json.dumps({"text": r["text"]},
                                                                               ensure_ascii=False) + "\n")
            n += 1
            if n >= docs:
                break


WRITERS = {"corpus": write_corpus, "wikitext-2": write_wikitext, "piqa": write_piqa}


def download(folder, parts=tuple(LAYOUT), overwrite: bool = False) -> list[str]:
    """Write `parts` of the local layout into `folder` from the hub. Each part is written in a temporary folder
    beside it and moved into place whole, so an interrupted download leaves no partial file. A part whose files
    are all there already is kept unless `overwrite`. Returns the parts written."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return [part for part in parts if download_part(folder, part, overwrite)]
    finally:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # nothing written (the hub failed): leave no empty folder behind


def download_part(folder: Path, part: str, overwrite: bool) -> bool:
    """One part of `download`; False when its files are there already (and not `overwrite`)."""
    files = LAYOUT[part]
    if not overwrite and all((folder / f).is_file() for f in files):
        return False
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{part}.") as tmp:
        for f in files:
            (Path(tmp) / f).parent.mkdir(parents=True, exist_ok=True)
        WRITERS[part](HUB[part].load(), Path(tmp))
        for f in files:
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / f, folder / f)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="streamline-jax-data", description="Write the data folder's local layout from the Hugging Face hub, "
        "once, for machines without the hub; then set STREAMLINE_JAX_DATA to it.",
        epilog="parts: " + "; ".join(f"{k}: {h.path}" + (f" ({h.name})" if h.name else "") + f", {h.split}, "
                                     f"{h.licence}" for k, h in HUB.items()))
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="write the local layout into DIR")
    d.add_argument("dir", metavar="DIR")
    d.add_argument("--parts", default=",".join(LAYOUT), help=f"comma-separated subset of {','.join(LAYOUT)}")
    d.add_argument("--overwrite", action="store_true", help="write parts that are there already again")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in parts if s not in LAYOUT]
    if unknown:
        print(f"error: unknown part(s) {', '.join(unknown)} (parts: {', '.join(LAYOUT)})", file=sys.stderr)
        return 2
    try:
        written = download(args.dir, parts, args.overwrite)
    except Exception as e:
        print(f"error: the Hugging Face hub failed ({type(e).__name__}: {str(e).strip()[:300]})", file=sys.stderr)
        return 1
    kept = [s for s in parts if s not in written]
    print(f"{Path(args.dir).absolute()}: wrote {', '.join(written) or 'nothing'}"
          + (f"; kept {', '.join(kept)} (there already)" if kept else "")
          + f". Use it with {ENV}={Path(args.dir).absolute()}")
    return 0
