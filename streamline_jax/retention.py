"""Dense vs pruned: the paper's stability metric, the answers' agreement and flips, and the retention report over the
results `evaluation.evaluate` gives for each model."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from .evaluation import EvaluationError
from .files import write_atomic
from .report import RETENTION_HEADER, answer_columns


def stability(dense_loglikelihoods: Sequence[Sequence[float]], pruned_loglikelihoods: Sequence[Sequence[float]],
              labels: Sequence[int]) -> float:
    """The paper's stability: how far the pruned model keeps the dense model's right/wrong pattern.

    Item i weighs w_i = softmax_i(std of the dense model's per-choice scores of item i): items the dense model
    separates clearly count more. Stability = sum of w_i over the items where both models are right or both wrong.
    (The authors' script sums the first k weights, k the number of such items; that is not the definition.)"""
    if not len(dense_loglikelihoods) == len(pruned_loglikelihoods) == len(labels):
        raise EvaluationError(f"stability needs the same items: {len(dense_loglikelihoods)} dense, "
                              f"{len(pruned_loglikelihoods)} pruned, {len(labels)} labels")
    if not labels:
        raise EvaluationError("stability needs at least one item")
    spread = np.array([np.std(np.asarray(s, np.float64)) for s in dense_loglikelihoods])
    weights = np.exp(spread - spread.max())
    weights /= weights.sum()
    dense_right = np.array([int(np.argmax(s)) == y for s, y in zip(dense_loglikelihoods, labels)])
    pruned_right = np.array([int(np.argmax(s)) == y for s, y in zip(pruned_loglikelihoods, labels)])
    return float(weights[dense_right == pruned_right].sum())


def answer_agreement(dense_loglikelihoods: Sequence[Sequence[float]], pruned_loglikelihoods: Sequence[Sequence[float]],
                     labels: Sequence[int]) -> dict:
    """What accuracy hides (Dutta et al. 2024, "Accuracy is not all you need"): `agreement`, the share of items on
    which both models pick the same choice; `flips`, the share whose correctness changed, `right_to_wrong` plus
    `wrong_to_right` (as shares; equal accuracies can hide many flips each way)."""
    if not len(dense_loglikelihoods) == len(pruned_loglikelihoods) == len(labels):
        raise EvaluationError(f"agreement needs the same items: {len(dense_loglikelihoods)} dense, "
                              f"{len(pruned_loglikelihoods)} pruned, {len(labels)} labels")
    if not labels:
        raise EvaluationError("agreement needs at least one item")
    dense_pick = np.array([int(np.argmax(s)) for s in dense_loglikelihoods])
    pruned_pick = np.array([int(np.argmax(s)) for s in pruned_loglikelihoods])
    gold = np.asarray(labels)
    dense_right, pruned_right = dense_pick == gold, pruned_pick == gold
    right_to_wrong = float(np.mean(dense_right & ~pruned_right))
    wrong_to_right = float(np.mean(~dense_right & pruned_right))
    return {"agreement": float(np.mean(dense_pick == pruned_pick)), "flips": right_to_wrong + wrong_to_right,
            "right_to_wrong": right_to_wrong, "wrong_to_right": wrong_to_right, "items": len(labels)}


@dataclasses.dataclass
class RetentionReport:
    """Dense vs pruned: one row per (task, metric) with the ratio (pruned/dense; dense/pruned for perplexity, so
    above 1 is better in both), the parameter counts, and for each multiple-choice task the paper's stability and
    the answers' agreement and flips (`answer_agreement`)."""

    rows: list[dict]
    num_params: dict
    layers: dict
    stability: dict
    mean_retention: float | None
    agreement: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            write_atomic(path, text + "\n")
        return text

    def to_markdown(self) -> str:
        lines = [RETENTION_HEADER, "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['task']} | {r['metric']} | {r['dense']:.4f} | {r['pruned']:.4f} | "
                         f"{r['retention']:.2%} | {answer_columns(r, self.stability, self.agreement)} |")
        d, p = self.num_params["dense"], self.num_params["pruned"]
        lines += ["", f"parameters: dense {d:,}, pruned {p:,} ({p / d:.2%}); "
                      f"layers: dense {self.layers['dense']}, pruned {self.layers['pruned']}"]
        if self.mean_retention is not None:
            lines.append(f"mean accuracy retention: {self.mean_retention:.2%}")
        return "\n".join(lines)

    __str__ = to_markdown


def compare(dense_results: dict, pruned_results: dict) -> RetentionReport:
    """A RetentionReport for the tasks both results share (`evaluate`'s output for each model)."""
    dense, pruned = dense_results["tasks"], pruned_results["tasks"]
    shared = [name for name in dense if name in pruned]
    if not shared:
        raise EvaluationError(f"no task in common: dense has {sorted(dense)}, pruned has {sorted(pruned)}")
    rows, stab, agree, accs = [], {}, {}, []
    for name in shared:
        d, p = dense[name], pruned[name]
        if d["kind"] != p["kind"]:
            raise EvaluationError(f"task {name!r} is {d['kind']} for dense but {p['kind']} for pruned")
        if d["kind"] == "perplexity":
            rows.append({"task": name, "metric": "perplexity", "dense": d["perplexity"], "pruned": p["perplexity"],
                         "retention": d["perplexity"] / p["perplexity"]})
            continue
        if d["labels"] != p["labels"]:
            raise EvaluationError(f"task {name!r}: dense and pruned results are over different items")
        for metric in ("acc", "acc_norm"):
            if metric in d and metric in p:
                rows.append({"task": name, "metric": metric, "dense": d[metric], "pruned": p[metric],
                             "retention": p[metric] / d[metric] if d[metric] else float("nan")})
        accs.append(p["acc"] / d["acc"] if d["acc"] else float("nan"))
        stab[name] = stability(d["loglikelihoods"], p["loglikelihoods"], d["labels"])
        agree[name] = answer_agreement(d["loglikelihoods"], p["loglikelihoods"], d["labels"])
    return RetentionReport(
        rows=rows,
        num_params={"dense": dense_results["num_params"], "pruned": pruned_results["num_params"]},
        layers={"dense": dense_results.get("layers"), "pruned": pruned_results.get("layers")},
        stability=stab,
        mean_retention=float(np.mean(accs)) if accs else None,
        agreement=agree,
    )
