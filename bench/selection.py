"""What a training job chooses on its held-out fold: best-threshold F1 against average precision.

A job holds out 30% of each class of the labels (`learning.labels.choose_folds`) and chooses its checkpoint and
identifier weight on them (`training.stages.select_identifier_weight`). With tens of held-out pairs, best-threshold
F1 ties across most candidates; average precision scores the whole ranking. This benchmark isolates that choice on
the untrained encoder (no training, so no training noise): for each benchmark, label set and seed, the identifier
weight each metric chooses on the held-out fold, and what the choice gives on the benchmark's `valid.csv` (never
test): F1 at the threshold fitted on the held-out fold (as the service's calibration does) and at valid's own best
threshold.

- `review`: one round of `GET /datasets/NAME/review` pages on a fresh `llmatch serve`, answered by the closed-world
  oracle of `bench.learning` (test pairs passed over), up to each budget; the same labels for every seed, so the
  seeds vary the fold.
- `random`: `train.csv` pairs in a seeded order; the seeds vary the labels and the fold.

    python -m bench.selection --datasets abt_buy dirty_walmart_amazon --budgets 100 200 --seeds 10
"""

from __future__ import annotations

import argparse
import random
import types
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.learning import Oracle, ingest, interval, label_review_pairs
from encoding.identifiers import combine, identifier_vectors
from encoding.recipe import Recipe, record_input
from evaluation import deepmatcher
from learning.labels import StoredLabel, choose_folds
from matching.calibration import best_f1_threshold, decision_metrics
from training.command import parse_weights
from training.data import TextPair, TrainingData

NAME = "selection"
METRICS = ("f1", "average_precision")
WEIGHTS = "0,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5"  # `llmatch train --identifier-weights`' default
Label = tuple[str, str, int]  # (tableA id, tableB id, label)


def main() -> None:
    args = parse_args()
    pool = common.load_encoder_pool()
    spec = pool.spec(common.ENCODER)
    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        benchmark = deepmatcher.load(args.data / name)
        label_sets = {"review": review_labels(benchmark, args.budgets), "random": None}
        space = Space.of(benchmark, pool, label_sets["review"])
        for strategy, fixed in label_sets.items():
            for budget in args.budgets:
                for seed in range(args.seeds):
                    labels = fixed[budget] if fixed else random_labels(benchmark, budget, seed)
                    rows += [
                        row | {"strategy": strategy, "budget": budget} for row in choose(space, spec, labels, seed)
                    ]
        print(markdown([r for r in rows if r["dataset"] == name], args), flush=True)
    common.publish(args.out, {"config": vars_of(args), "machine": common.machine(), "rows": rows}, markdown(rows, args))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["abt_buy", "dirty_walmart_amazon"])
    parser.add_argument("--data", type=Path, default=common.DATASETS_DIR)
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=common.default_out(NAME))
    return parser.parse_args()


def vars_of(args: argparse.Namespace) -> dict[str, str]:
    return {key: str(value) for key, value in vars(args).items()}


def review_labels(benchmark: deepmatcher.Benchmark, budgets: list[int]) -> dict[int, list[Label]]:
    """The labels one round of review pages gathers on a fresh service (untrained encoder), at each budget."""
    oracle = Oracle.of(benchmark)
    found: dict[int, list[Label]] = {}
    with common.Server() as server, server.client() as client:
        ingest(client, "review", benchmark)
        common.wait_encoded(client, len(benchmark.table_a) + len(benchmark.table_b), 3600, dataset="review")
        for budget in sorted(budgets):
            label_review_pairs(client, "review", oracle, budget)
            stored = common.check(client.get("/datasets/review/labels")).json()["pairs"]
            found[budget] = [
                _crossing(pair) for pair in stored if {pair["left_source"], pair["right_source"]} == {"a", "b"}
            ]
    return found


def _crossing(pair: dict[str, Any]) -> Label:
    sides = {pair["left_source"]: pair["left_id"], pair["right_source"]: pair["right_id"]}
    return sides["a"], sides["b"], pair["label"]


def random_labels(benchmark: deepmatcher.Benchmark, budget: int, seed: int) -> list[Label]:
    """The first ``budget`` train.csv pairs in a seeded order (as bench.learning's random strategy)."""
    shuffled = list(benchmark.splits["train"])
    random.Random(seed).shuffle(shuffled)
    return [(p.left_id, p.right_id, p.label) for p in shuffled[:budget]]


class Space:
    """The untrained encoder's dense vectors and identifier features of every record a label or valid.csv names."""

    def __init__(self, name: str, inputs: dict[str, Any], dense: dict[str, np.ndarray], codes: dict[str, Any], valid):
        self.name, self.inputs, self.dense, self.codes, self.valid = name, inputs, dense, codes, valid

    @classmethod
    def of(cls, benchmark: deepmatcher.Benchmark, pool, review: dict[int, list[Label]]) -> Space:
        inputs = rendered_inputs(benchmark)
        valid = [(p.left_id, p.right_id, p.label) for p in benchmark.valid]
        wanted = sorted(
            {key(benchmark.name, "a", a) for a, _, _ in valid}
            | {key(benchmark.name, "b", b) for _, b, _ in valid}
            | {
                key(benchmark.name, s, i)
                for pairs in review.values()
                for a, b, _ in pairs
                for s, i in (("a", a), ("b", b))
            }
            | {key(benchmark.name, "a", p.left_id) for p in benchmark.splits["train"]}
            | {key(benchmark.name, "b", p.right_id) for p in benchmark.splits["train"]}
        )
        vectors = pool.encode(common.ENCODER, [inputs[k] for k in wanted])
        codes = identifier_vectors([inputs[k].text for k in wanted])
        return cls(
            benchmark.name,
            inputs,
            dict(zip(wanted, vectors, strict=True)),
            dict(zip(wanted, codes, strict=True)),
            valid,
        )

    def scores(self, pairs: list[Label], weight: float) -> tuple[np.ndarray, np.ndarray]:
        lefts = [key(self.name, "a", a) for a, _, _ in pairs]
        rights = [key(self.name, "b", b) for _, b, _ in pairs]
        left, right = self._rows(lefts, weight), self._rows(rights, weight)
        return np.sum(left * right, axis=1), np.array([label for _, _, label in pairs])

    def _rows(self, keys: list[str], weight: float) -> np.ndarray:
        dense = np.stack([self.dense[k] for k in keys])
        return combine(dense, np.stack([self.codes[k] for k in keys]), weight) if weight else dense


def rendered_inputs(benchmark: deepmatcher.Benchmark) -> dict[str, Any]:
    """Every record's encoder input keyed ``dataset/source/id``, as the service renders a dataset created with the
    benchmark's attributes."""
    dataset = types.SimpleNamespace(
        serialization="tagged", attributes=benchmark.attributes, instruction=None, seen_attributes=None
    )
    recipe = Recipe.of_dataset(dataset)
    return {
        key(benchmark.name, source, row["id"]): record_input(row["attributes"], recipe).item
        for source, table in (("a", benchmark.table_a), ("b", benchmark.table_b))
        for row in table
    }


def key(dataset: str, source: str, record_id: str) -> str:
    return f"{dataset}/{source}/{record_id}"


def held_out(labels: list[Label], seed: int) -> list[Label]:
    """The labels a job with training seed ``seed`` holds out when it first reads these labels."""
    stored = [StoredLabel(i, ("a", a), ("b", b), 0, 0, label, None) for i, (a, b, label) in enumerate(labels)]
    return [labels[i] for i, holdout in choose_folds(stored, seed).items() if holdout]


def choose(space: Space, spec, labels: list[Label], seed: int) -> list[dict[str, Any]]:
    """The weight each metric chooses on the job's held-out fold, and its valid.csv F1."""
    from training.stages import best_identifier_weight, select_identifier_weight

    held = held_out(labels, seed)
    data = TrainingData([space.name], "tagged", None)
    data.inputs = {k: space.inputs[k] for a, b, _ in held for k in (key(space.name, "a", a), key(space.name, "b", b))}
    data.splits["valid"][space.name] = [
        TextPair(key(space.name, "a", a), key(space.name, "b", b), label) for a, b, label in held
    ]
    rows = []
    for metric in METRICS:
        selection = select_identifier_weight(spec, data, "cpu", parse_weights(WEIGHTS), metric)
        weight = best_identifier_weight(selection, metric)["weight"]
        threshold = best_f1_threshold(*space.scores(held, weight)).threshold
        valid_scores, valid_truth = space.scores(space.valid, weight)
        rows.append(
            {
                "dataset": space.name,
                "seed": seed,
                "labels": len(labels),
                "matches": sum(label for _, _, label in labels),
                "holdout_pairs": len(held),
                "holdout_matches": sum(label for _, _, label in held),
                "metric": metric,
                "weight": weight,
                "valid_f1": decision_metrics(valid_scores, valid_truth, threshold).f1,
                "valid_best_f1": best_f1_threshold(valid_scores, valid_truth).f1,
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    headers = ["benchmark", "labels", "strategy", "held-out pairs (matches)", "weights chosen: F1 / AP"]
    headers += [
        "valid F1, F1-chosen",
        "valid F1, AP-chosen",
        "AP − F1 (paired, 95% CI)",
        "valid best-threshold F1: F1 / AP",
    ]
    table = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for budget in args.budgets:
            for strategy in ("review", "random"):
                cell = [r for r in rows if (r["dataset"], r["budget"], r["strategy"]) == (name, budget, strategy)]
                if not cell:
                    continue
                by = {m: sorted((r for r in cell if r["metric"] == m), key=lambda r: r["seed"]) for m in METRICS}
                f1, ap = (np.array([r["valid_f1"] for r in by[m]]) for m in METRICS)
                best_f1, best_ap = (np.mean([r["valid_best_f1"] for r in by[m]]) for m in METRICS)
                table.append(
                    [
                        name,
                        budget,
                        strategy,
                        f"{np.mean([r['holdout_pairs'] for r in by['f1']]):.0f} "
                        f"({np.mean([r['holdout_matches'] for r in by['f1']]):.1f})",
                        " ".join(f"{r['weight']:g}" for r in by["f1"])
                        + " / "
                        + " ".join(f"{r['weight']:g}" for r in by["average_precision"]),
                        "{:.3f} ± {:.3f}".format(*interval(f1)),
                        "{:.3f} ± {:.3f}".format(*interval(ap)),
                        "{:+.3f} ± {:.3f}".format(*interval(ap - f1)),
                        f"{best_f1:.3f} / {best_ap:.3f}",
                    ]
                )
    return common.markdown_table(headers, table)


if __name__ == "__main__":
    main()
