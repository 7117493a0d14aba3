"""Where a training job chooses the identifier weight: on the held-out fold after training, or before training on
every label, scored by the base encoder (which trained on none of them). valid.csv only; test is not read.

For each benchmark, label set and seed, the job's own pieces: its folds (`learning.labels.choose_folds`), its
recipe's supervised stage on the train fold (checkpoint chosen on the held-out fold's average precision), then
the identifier weight chosen two ways:

- `fold`: after training, on the held-out fold's average precision (`training.stages.select_identifier_weight`);
- `labels`: before training, on every label's average precision with the base encoder
  (`learning.train_job.choose_identifier_weight`).

Each weight's valid.csv F1 is read at the threshold of best F1 on the held-out fold (as the switch fits it) and at
valid's own best threshold. One training serves both arms, so the difference is the choice alone. Label sets are
those of `bench.selection`: `review` is one round of `/review` pages on a fresh service (the same labels in every
seed: the seeds vary the fold), `random` is `train.csv` pairs in a seeded order.

    python -m bench.weight_choice --datasets abt_buy dirty_walmart_amazon --budgets 100 200 --seeds 5
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.learning import interval
from bench.selection import Label, held_out, key, random_labels, rendered_inputs, review_labels, vars_of
from encoding.identifiers import combine, identifier_vectors
from encoding.registry import load_encoder
from evaluation import deepmatcher
from learning.train_job import SELECTION_METRIC, choose_identifier_weight, recipe_arguments
from llmatch.settings import Settings
from matching.calibration import best_f1_threshold, decision_metrics
from training.command import parse_weights, resolve_base, stage_options
from training.data import TextPair, TrainingData
from training.stages import best_identifier_weight, run_stage, select_identifier_weight

NAME = "weight_choice"
ARMS = ("fold", "labels")


def main() -> None:
    args = parse_args()
    settings = Settings(data_dir=args.work)
    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        benchmark = deepmatcher.load(args.data / name)
        inputs = rendered_inputs(benchmark)
        review = review_labels(benchmark, args.budgets)
        for strategy in args.strategies:
            for budget in args.budgets:
                for seed in range(args.seeds):
                    labels = review[budget] if strategy == "review" else random_labels(benchmark, budget, seed)
                    found = measure(benchmark, inputs, labels, seed, settings)
                    rows += [row | {"strategy": strategy, "budget": budget} for row in found]
                    common.write_report(args.out, {"config": vars_of(args), "rows": rows})
        print(markdown([row for row in rows if row["dataset"] == name]), flush=True)
    common.publish(args.out, {"config": vars_of(args), "machine": common.machine(), "rows": rows}, markdown(rows))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["abt_buy", "dirty_walmart_amazon"])
    parser.add_argument("--data", type=Path, default=common.DATASETS_DIR)
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--strategies", nargs="+", choices=("review", "random"), default=["review", "random"])
    parser.add_argument("--work", type=Path, default=common.OUT_DIR / NAME, help="where the encoders are resolved")
    parser.add_argument("--out", type=Path, default=common.default_out(NAME))
    return parser.parse_args()


def job_data(name: str, inputs: dict[str, Any], labels: list[Label], held: list[Label]) -> TrainingData:
    """The labels as a job holds them: ``train`` the train fold, ``valid`` the held-out fold."""
    held_set = set(held)
    data = TrainingData([name], "tagged", None)
    data.inputs = {k: inputs[k] for a, b, _ in labels for k in (key(name, "a", a), key(name, "b", b))}
    data.splits["train"][name] = [_pair(name, label) for label in labels if label not in held_set]
    data.splits["valid"][name] = [_pair(name, label) for label in held]
    return data


def _pair(name: str, label: Label) -> TextPair:
    return TextPair(key(name, "a", label[0]), key(name, "b", label[1]), label[2])


def measure(
    benchmark: deepmatcher.Benchmark, inputs: dict[str, Any], labels: list[Label], seed: int, settings: Settings
) -> list[dict[str, Any]]:
    """One training on the job's train fold; each arm's weight and its valid.csv F1."""
    name = benchmark.name
    held = held_out(labels, seed)
    data = job_data(name, inputs, labels, held)
    base = resolve_base(common.ENCODER, settings)
    args = recipe_arguments(seed)
    weights = parse_weights(args.identifier_weights)
    chosen = {"labels": choose_identifier_weight(base, data, weights, "cpu")[0]}
    valid = [(p.left_id, p.right_id, p.label) for p in benchmark.valid]
    keys = sorted({key(name, s, i) for a, b, _ in valid + held for s, i in (("a", a), ("b", b))})
    with tempfile.TemporaryDirectory() as folder:
        options = stage_options("supervised", base.spec, args, "cpu")
        trained = run_stage("supervised", base, data, options, Path(folder) / "supervised", "cpu")
        selection = select_identifier_weight(trained.spec, data, "cpu", weights, SELECTION_METRIC)
        chosen["fold"] = best_identifier_weight(selection, SELECTION_METRIC)["weight"]
        encoder = load_encoder(replace(trained.spec, identifier_weight=0.0), "cpu")
        dense = encoder.encode([inputs[k] for k in keys], batch_size=trained.spec.batch_size)
    codes = identifier_vectors([inputs[k].text for k in keys])
    stage = trained.history[-1]
    rows = []
    for arm in ARMS:
        weight = chosen[arm]
        vectors = dict(zip(keys, combine(dense, codes, weight) if weight else dense, strict=True))
        threshold = best_f1_threshold(*_scores(vectors, name, held)).threshold
        scores, truth = _scores(vectors, name, valid)
        rows.append(
            {
                "dataset": name,
                "seed": seed,
                "labels": len(labels),
                "matches": sum(label for *_, label in labels),
                "holdout_pairs": len(held),
                "steps": stage["steps"],
                "best_step": stage["best_step"],
                "arm": arm,
                "weight": weight,
                "valid_f1": decision_metrics(scores, truth, threshold).f1,
                "valid_best_f1": best_f1_threshold(scores, truth).f1,
            }
        )
    return rows


def _scores(vectors: dict[str, np.ndarray], name: str, pairs: list[Label]) -> tuple[np.ndarray, np.ndarray]:
    left = np.stack([vectors[key(name, "a", a)] for a, _, _ in pairs])
    right = np.stack([vectors[key(name, "b", b)] for _, b, _ in pairs])
    return np.sum(left * right, axis=1), np.array([label for *_, label in pairs])


def markdown(rows: list[dict[str, Any]]) -> str:
    headers = ["benchmark", "labels", "strategy", "seeds", "weights chosen: fold / labels"]
    headers += ["valid F1: fold", "valid F1: labels", "labels − fold (paired)"]
    headers += ["valid best-threshold F1: fold / labels"]
    table = []
    cells = sorted({(r["dataset"], r["budget"], r["strategy"]) for r in rows}, key=lambda c: (c[0], c[1], c[2]))
    for dataset, budget, strategy in cells:
        cell = [r for r in rows if (r["dataset"], r["budget"], r["strategy"]) == (dataset, budget, strategy)]
        arms = {arm: sorted((r for r in cell if r["arm"] == arm), key=lambda r: r["seed"]) for arm in ARMS}
        f1 = {arm: np.array([r["valid_f1"] for r in arms[arm]]) for arm in ARMS}
        best = {arm: np.array([r["valid_best_f1"] for r in arms[arm]]) for arm in ARMS}
        table.append(
            [
                dataset,
                budget,
                strategy,
                len(f1["fold"]),
                " / ".join(",".join(f"{r['weight']:g}" for r in arms[arm]) for arm in ARMS),
                _mean(f1["fold"]),
                _mean(f1["labels"]),
                _mean(f1["labels"] - f1["fold"], signed=True),
                f"{best['fold'].mean():.3f} / {best['labels'].mean():.3f}",
            ]
        )
    return common.markdown_table(headers, table)


def _mean(values: np.ndarray, signed: bool = False) -> str:
    mean, half = interval(values)
    return f"{mean:+.3f} ± {half:.3f}" if signed else f"{mean:.3f} ± {half:.3f}"


if __name__ == "__main__":
    main()
