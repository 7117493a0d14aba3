"""Few labels: test F1 of the trained encoder against the number of labelled pairs it was trained on.

For each benchmark, size and seed: a stratified sample of ``size`` pairs of ``train.csv`` (its share of matches
kept) and of ``valid.csv`` scaled alike (``size`` times valid/train pairs, at least ``--min-valid``) go into a
DeepMatcher folder beside the full tables and ``test.csv``; then, exactly as a user would,

    llmatch train FOLDER --base minilm --seed SEED --out RUN/trained    (supervised, then identifiers)
    llmatch evaluate FOLDER --encoder RUN/trained/identifiers --paired-only --out RUN/eval

so the checkpoint, the identifier weight and the threshold are all chosen on the small valid sample, and test F1
is measured on the whole ``test.csv``. A finished run's report is reused when the command is run again (delete
``--work`` to start afresh); trained weights are removed once evaluated (manifests stay).

    python -m bench.few_labels --datasets abt_buy dirty_walmart_amazon --sizes 50 100 250 500 1000 --seeds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, trained_runs

NAME = "few_labels"


def main() -> None:
    args = parse_args()
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": common.machine()}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in args.datasets}
    for size in args.sizes:  # in the order given, across benchmarks: a stopped run still covers every benchmark
        for name in args.datasets:
            for seed in range(args.seeds):
                results[name].append(run(args.data / name, size, seed, args))
                common.write_report(args.out, {**report, "results": results})
    report["results"] = results
    sizes = sorted(args.sizes)
    table = markdown(results, sizes)
    figure(results, sizes, args.figure)
    report["figure"] = str(args.figure)
    common.publish(args.out, report, table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["abt_buy", "dirty_walmart_amazon"])
    parser.add_argument("--data", type=Path, default=common.DATASETS_DIR)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 250, 500, 1000])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--min-valid", type=int, default=10, help="fewest valid pairs of a sample")
    parser.add_argument("--train-flags", default="", help="extra `llmatch train` options, space-separated")
    parser.add_argument("--work", type=Path, default=common.OUT_DIR / NAME, help="samples, models and reports")
    parser.add_argument("--out", type=Path, default=common.default_out(NAME))
    parser.add_argument("--figure", type=Path, default=common.REPO_ROOT / "docs" / "figures" / "few_labels.png")
    return parser.parse_args()


def run(source: Path, size: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Sample, train, evaluate (or reuse a finished run's result)."""
    work = args.work / source.name / f"n{size}-s{seed}"
    done = work / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    _, train_rows = trained_runs.read_pairs(source / "train.csv")
    _, valid_rows = trained_runs.read_pairs(source / "valid.csv")
    valid_size = max(args.min_valid, round(size * len(valid_rows) / len(train_rows)))
    folder = trained_runs.subsampled_folder(source, work / "data", size, valid_size, seed)
    flags = ["--seed", str(seed), *args.train_flags.split()]
    seconds = trained_runs.train([folder], work / "trained", flags)
    evaluation = trained_runs.evaluate(folder, work / "trained" / "identifiers", work / "eval", seconds)
    manifest = json.loads((work / "trained" / "supervised" / "manifest.json").read_text())
    result = {
        "size": size,
        "seed": seed,
        "valid_pairs": valid_size,
        "train_matches": sum(row[-1] == "1" for row in trained_runs.read_pairs(folder / "train.csv")[1]),
        "steps": manifest["stages"][-1]["steps"],
        **evaluation.as_dict(),
    }
    trained_runs.drop_weights(work / "trained")
    done.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{source.name} n={size} seed {seed}: test F1 {evaluation.test_f1:.3f}")
    return result


def by_size(runs: list[dict[str, Any]], size: int, key: str) -> np.ndarray:
    return np.array([r[key] for r in runs if r["size"] == size], dtype=float)


def markdown(results: dict[str, list[dict[str, Any]]], sizes: list[int]) -> str:
    headers = ["benchmark", "train pairs", "valid pairs", "matches in train", "test F1 (mean ± sd)", "min", "max"]
    headers += ["valid F1", "test ECE", "minutes per run"]
    rows = []
    for name, runs in results.items():
        for size in sizes:
            f1 = by_size(runs, size, "test_f1")
            if not len(f1):
                continue
            minutes = (by_size(runs, size, "train_seconds") + by_size(runs, size, "evaluate_seconds")) / 60
            rows.append(
                [
                    name,
                    size,
                    int(by_size(runs, size, "valid_pairs")[0]),
                    f"{by_size(runs, size, 'train_matches').mean():.0f}",
                    f"{f1.mean():.3f} ± {sample_sd(f1):.3f}",
                    f"{f1.min():.3f}",
                    f"{f1.max():.3f}",
                    f"{by_size(runs, size, 'valid_f1').mean():.3f}",
                    f"{by_size(runs, size, 'test_ece').mean():.3f}",
                    f"{minutes.mean():.1f}",
                ]
            )
    return common.markdown_table(headers, rows)


def sample_sd(values: np.ndarray) -> float:
    """The sample standard deviation (n - 1); 0 for a single run."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def figure(results: dict[str, list[dict[str, Any]]], sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results.items():
        done = [s for s in sizes if len(by_size(runs, s, "test_f1"))]
        means = [by_size(runs, s, "test_f1").mean() for s in done]
        stds = [sample_sd(by_size(runs, s, "test_f1")) for s in done]
        ax.errorbar(done, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("labelled train pairs (valid scaled alike)")
    ax.set_ylabel("test F1 (threshold chosen on valid)")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
