"""Active learning: valid F1 of the threshold calibrated on labels chosen by GET /review, against the same
numbers of labels drawn at random, on DeepMatcher benchmarks with ``train.csv`` as the oracle.

One real server (MiniLM, untrained). Per benchmark, the records that ``valid.csv`` references are loaded once and
every valid pair is scored with GET /match. Per seed, a pool is drawn: a random ``--pool-share`` of the left
records of ``train.csv`` with every record their train pairs reference (with ``--fixed-pool`` the same pool for
every seed, so that seeds vary only the random draws).
Each strategy gets its own dataset holding that pool:

- ``review`` / ``balanced`` / ``diverse``: rounds of GET /review (``strategy=uncertainty``, ``balanced``,
  ``diverse``); walking down its order, the oracle answers pairs that ``train.csv`` labels and the others are
  passed over (not labelled, not counted; the report gives their share). After each round the labels are
  stored (PUT /labels) and, once they hold both classes, the dataset is calibrated on them
  (``{"from": "labels"}``), which moves the next round's threshold.
- ``random``: pairs drawn uniformly from the pool's ``train.csv`` pairs, calibrated the same way.

At each budget the calibrated threshold is applied to the valid scores (F1); a run whose labels hold one class
only has no threshold and counts as F1 0 (the table says how many runs were calibrated). The ceiling is the
threshold calibrated on every ``train.csv`` pair of the pool.

    python -m bench.active_learning --datasets abt_buy --seeds 3 --fixed-pool --pool-share 0.2 --valid-share 0.25 \
        --skip-columns description
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

try:
    from bench import common, labelled
except ModuleNotFoundError:
    import common  # type: ignore[no-redef]
    import labelled  # type: ignore[no-redef]

from matching.calibration import decision_metrics

NAME = "active_learning"
STRATEGIES = ("review", "balanced", "diverse", "random")


def main() -> None:
    args = parse_args()
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": common.machine()}
    results: dict[str, Any] = {}
    with (
        common.fresh_database(args.database_url) as url,
        common.Server(url, log_copy=args.out.with_suffix(".server.log")) as server,
    ):
        client = server.client()
        for name in args.datasets:
            results[name] = run_benchmark(client, labelled.load_benchmark(args.data / name, args.skip_columns), args)
    report["results"] = results
    table = markdown(results, args.budgets)
    figure(results, args.budgets, args.figure)
    report["figure"] = str(args.figure)
    common.publish(args.out, report, table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["abt_buy", "dirty_walmart_amazon"])
    parser.add_argument("--data", type=Path, default=common.DATASETS_DIR)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--round", type=int, default=10, help="labels per round between recalibrations")
    parser.add_argument("--pool-share", type=float, default=0.8, help="share of train left records in a seed's pool")
    parser.add_argument(
        "--fixed-pool", action="store_true", help="the same pool for every seed (seeds then vary the random draws only)"
    )
    parser.add_argument("--valid-share", type=float, default=1.0, help="share of valid pairs scored (fixed draw)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument(
        "--skip-columns", nargs="*", default=[], help="columns left out of the records (e.g. long descriptions)"
    )
    parser.add_argument("--out", type=Path, default=common.default_out(NAME))
    parser.add_argument(
        "--figure", type=Path, default=None, help="PNG (default: docs/figures/active_learning-<datasets>.png)"
    )
    common.add_server_arguments(parser)
    args = parser.parse_args()
    if args.figure is None:
        args.figure = common.REPO_ROOT / "docs" / "figures" / f"active_learning-{'-'.join(args.datasets)}.png"
    return args


def run_benchmark(client: httpx.Client, benchmark: labelled.Benchmark, args: argparse.Namespace) -> dict[str, Any]:
    valid_dataset = f"{benchmark.name}-valid".replace("_", "-")
    valid = benchmark.pairs("valid")
    kept = random.Random(0).sample(sorted(valid), round(args.valid_share * len(valid)))
    valid = {pair: valid[pair] for pair in sorted(kept)}
    labelled.load_records(client, benchmark, valid_dataset, {ref for pair in valid for ref in pair})
    scores = labelled.match_scores(client, valid_dataset, valid)
    valid_scores = np.array([scores[p] for p in valid])
    valid_labels = np.array([valid[p] for p in valid])
    train = benchmark.pairs("train")
    runs: dict[str, list[dict[str, Any]]] = {strategy: [] for strategy in args.strategies}
    ceilings = []
    for seed in range(args.seeds):
        rng = random.Random(0 if args.fixed_pool else seed)
        lefts = sorted({pair[0][1] for pair in train})
        chosen = set(rng.sample(lefts, round(args.pool_share * len(lefts))))
        pool = {pair: label for pair, label in train.items() if pair[0][1] in chosen}
        refs = {ref for pair in pool for ref in pair}
        for strategy in args.strategies:
            dataset = f"{benchmark.name}-s{seed}-{strategy}".replace("_", "-")
            labelled.load_records(client, benchmark, dataset, refs)
            began = time.perf_counter()
            if strategy == "random":
                run = random_run(
                    client, dataset, pool, args.budgets, random.Random(1000 + seed), valid_scores, valid_labels
                )
            else:
                mode = "uncertainty" if strategy == "review" else strategy
                run = review_run(client, dataset, pool, args.budgets, args.round, mode, valid_scores, valid_labels)
            run["seconds"] = time.perf_counter() - began
            run["seed"] = seed
            runs[strategy].append(run)
            print(f"{benchmark.name} seed {seed} {strategy}: {run['f1']}")
        ceiling = calibrate(client, f"{benchmark.name}-s{seed}-random".replace("_", "-"), pool)
        ceilings.append(decision_metrics(valid_scores, valid_labels, ceiling).f1 if ceiling is not None else 0.0)
    return {"pool_pairs": len(pool), "valid_pairs": len(valid), "runs": runs, "ceiling_f1": ceilings}


def review_run(
    client: httpx.Client,
    dataset: str,
    oracle: dict[labelled.Pair, int],
    budgets: list[int],
    round_size: int,
    mode: str,
    valid_scores: np.ndarray,
    valid_labels: np.ndarray,
) -> dict[str, Any]:
    """Label the pairs /review asks about (those the oracle knows), recalibrating after every round."""
    answers: dict[labelled.Pair, int] = {}
    passed_over: set[labelled.Pair] = set()
    f1: dict[int, float | None] = {}
    threshold: float | None = None
    while len(answers) < max(budgets):
        wanted = min(round_size, min(b for b in budgets if b > len(answers)) - len(answers))
        page = common.check(client.get(f"/datasets/{dataset}/review", params={"limit": 5000, "strategy": mode}))
        batch: dict[labelled.Pair, int] = {}
        for pair in page.json()["pairs"]:
            key = ((pair["left"]["source"], pair["left"]["id"]), (pair["right"]["source"], pair["right"]["id"]))
            key = key if key[0][0] == "a" else (key[1], key[0])
            if key in oracle:
                batch[key] = oracle[key]
                if len(batch) == wanted:
                    break
            else:
                passed_over.add(key)
        if not batch:
            break  # nothing the oracle can answer among the first 5000 suggestions
        common.check(client.put(f"/datasets/{dataset}/labels", json=labelled.label_body(batch)))
        answers.update(batch)
        threshold = calibrate_from_labels(client, dataset, answers)
        if len(answers) in budgets:
            f1[len(answers)] = None if threshold is None else decision_metrics(valid_scores, valid_labels, threshold).f1
    suggested = len(answers) + len(passed_over)
    return {
        "f1": f1,
        "labels": len(answers),
        "positives": sum(answers.values()),
        "passed_over_share": len(passed_over) / max(suggested, 1),
    }


def random_run(
    client: httpx.Client,
    dataset: str,
    pool: dict[labelled.Pair, int],
    budgets: list[int],
    rng: random.Random,
    valid_scores: np.ndarray,
    valid_labels: np.ndarray,
) -> dict[str, Any]:
    order = rng.sample(sorted(pool), max(budgets))
    f1: dict[int, float | None] = {}
    for budget in budgets:
        answers = {pair: pool[pair] for pair in order[:budget]}
        common.check(client.put(f"/datasets/{dataset}/labels", json=labelled.label_body(answers)))
        threshold = calibrate_from_labels(client, dataset, answers)
        f1[budget] = None if threshold is None else decision_metrics(valid_scores, valid_labels, threshold).f1
    answers = {pair: pool[pair] for pair in order}
    return {"f1": f1, "labels": len(answers), "positives": sum(answers.values()), "passed_over_share": 0.0}


def calibrate_from_labels(client: httpx.Client, dataset: str, answers: dict[labelled.Pair, int]) -> float | None:
    if not 0 < sum(answers.values()) < len(answers):
        return None
    return common.check(client.post(f"/datasets/{dataset}/calibrate", json={"from": "labels"})).json()["threshold"]


def calibrate(client: httpx.Client, dataset: str, pairs: dict[labelled.Pair, int]) -> float | None:
    """The threshold on explicit pairs (the ceiling: every train pair of the pool)."""
    body = labelled.label_body(pairs)
    return common.check(client.post(f"/datasets/{dataset}/calibrate", json=body)).json()["threshold"]


def summary(runs: list[dict[str, Any]], budget: int) -> tuple[float, float, int]:
    values = [run["f1"].get(budget) for run in runs]
    calibrated = sum(v is not None for v in values)
    scores = np.array([v if v is not None else 0.0 for v in values])
    spread = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0  # sample standard deviation
    return float(scores.mean()), spread, calibrated


def markdown(results: dict[str, Any], budgets: list[int]) -> str:
    headers = ["benchmark", "labels", *[f"{s} F1" for s in STRATEGIES], "review / random", "ceiling (all train)"]
    rows = []
    for name, result in results.items():
        runs = result["runs"]
        ceiling = float(np.mean(result["ceiling_f1"]))
        for budget in budgets:
            cells = {}
            for strategy in STRATEGIES:
                if strategy in runs:
                    mean, std, calibrated = summary(runs[strategy], budget)
                    cells[strategy] = (mean, f"{mean:.3f} ± {std:.3f} ({calibrated}/{len(runs[strategy])})")
            ratio = (
                cells["review"][0] / cells["random"][0]
                if cells.get("random", (0,))[0] and "review" in cells
                else float("nan")
            )
            rows.append(
                [name, budget, *[cells.get(s, (0, "-"))[1] for s in STRATEGIES], f"{ratio:.2f}", f"{ceiling:.3f}"]
            )
        shares = {s: np.mean([r["passed_over_share"] for r in runs[s]]) for s in runs if s != "random"}
        rows.append([name, "passed over", *[f"{shares[s]:.0%}" if s in shares else "-" for s in STRATEGIES], "", ""])
    return common.markdown_table(headers, rows)


def figure(results: dict[str, Any], budgets: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        for strategy, runs in result["runs"].items():
            means = [summary(runs, b)[0] for b in budgets]
            stds = [summary(runs, b)[1] for b in budgets]
            ax.errorbar(budgets, means, yerr=stds, marker="o", capsize=3, label=strategy)
        ax.axhline(float(np.mean(result["ceiling_f1"])), color="grey", linestyle="--", label="all train pairs")
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_title(name)
        ax.set_xlabel("labels")
        ax.set_ylabel("valid F1 of the calibrated threshold")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
