"""Transfer: an encoder trained on other benchmarks, evaluated on one it never saw; and one encoder for all.

- **Leave one dataset out**: for each benchmark, ``llmatch train`` on the other ones only (its checkpoint and
  identifier weight chosen on *their* valid pairs), then ``llmatch evaluate`` on the held-out benchmark: its
  threshold is chosen on its own valid.csv, the figure a user gets with no training labels of their own.
- **All together**: one ``llmatch train`` over every benchmark, evaluated on each.

Training sets are sampled to fit a two-core CPU: at most ``--train-pairs`` pairs of each ``train.csv`` and
``--valid-pairs`` of each ``valid.csv`` (stratified, the share of matches kept; the same samples for every run).
Evaluation always uses the full valid.csv (threshold) and test.csv. A finished run's result is reused when the
command is run again (delete ``--work`` to start afresh); trained weights are removed once evaluated.

    python -m bench.transfer --train-pairs 1500 --valid-pairs 500
    python -m bench.transfer --train-pairs 500 --valid-pairs 200 --skip-loo   # the all-together run alone
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench import common, trained_runs

NAME = "transfer"
BENCHMARKS = ["abt_buy", "dirty_dblp_acm", "dirty_dblp_scholar", "dirty_itunes_amazon", "dirty_walmart_amazon"]


def main() -> None:
    args = parse_args()
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": common.machine()}
    samples = {name: sample(name, args) for name in args.datasets}
    results: dict[str, Any] = {"leave_one_out": {}, "all_together": {}}
    for held_out in [] if args.skip_loo else args.datasets:
        others = [samples[name] for name in args.datasets if name != held_out]
        results["leave_one_out"][held_out] = run(f"without-{held_out}", others, [held_out], args)[held_out]
        common.write_report(args.out, {**report, "results": results})
    if not args.skip_all:
        results["all_together"] = run("all", list(samples.values()), args.datasets, args)
    report["results"] = results
    common.publish(args.out, report, markdown(results, args.datasets))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=BENCHMARKS)
    parser.add_argument("--data", type=Path, default=common.DATASETS_DIR)
    parser.add_argument("--train-pairs", type=int, default=1500, help="most train pairs per benchmark")
    parser.add_argument("--valid-pairs", type=int, default=500, help="most valid pairs per benchmark (training)")
    parser.add_argument("--seed", type=int, default=0, help="of the samples and of training")
    parser.add_argument("--skip-all", action="store_true", help="leave-one-out only")
    parser.add_argument("--skip-loo", action="store_true", help="the encoder trained on all benchmarks only")
    parser.add_argument("--work", type=Path, default=common.OUT_DIR / NAME, help="samples, models and reports")
    parser.add_argument("--out", type=Path, default=common.default_out(NAME))
    return parser.parse_args()


def sample(name: str, args: argparse.Namespace) -> Path:
    """The benchmark's training folder: its tables with sampled train and valid pairs."""
    target = args.work / "data"
    if (target / name / "valid.csv").exists():
        return target / name
    return trained_runs.subsampled_folder(args.data / name, target, args.train_pairs, args.valid_pairs, args.seed)


def run(label: str, folders: list[Path], evaluated: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Train one encoder on ``folders``; evaluate it on each full benchmark of ``evaluated``."""
    work = args.work / label
    done = work / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    seconds = trained_runs.train(folders, work / "trained", ["--seed", str(args.seed)])
    encoder = work / "trained" / "identifiers"
    result: dict[str, Any] = {}
    for name in evaluated:
        evaluation = trained_runs.evaluate(args.data / name, encoder, work / "eval" / name, seconds)
        result[name] = {"trained_on": [f.name for f in folders], **evaluation.as_dict()}
        print(f"{label} on {name}: test F1 {evaluation.test_f1:.3f}")
    trained_runs.drop_weights(work / "trained")
    work.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(results: dict[str, Any], datasets: list[str]) -> str:
    headers = ["benchmark", "trained on", "identifier weight", "threshold", "valid F1", "test P", "test R", "test F1"]
    headers += ["test ECE", "train (min)", "evaluate (min)"]
    rows = []
    for kind, label in (("leave_one_out", "the other {n}"), ("all_together", "all {m}")):
        for name in datasets:
            r = results[kind].get(name)
            if r is None:
                continue
            rows.append(
                [
                    name,
                    label.format(n=len(r["trained_on"]), m=len(r["trained_on"])),
                    f"{r['identifier_weight'] or 0:g}",
                    f"{r['threshold']:.3f}",
                    f"{r['valid_f1']:.3f}",
                    f"{r['test_precision']:.3f}",
                    f"{r['test_recall']:.3f}",
                    f"**{r['test_f1']:.3f}**",
                    "-" if r["test_ece"] is None else f"{r['test_ece']:.3f}",
                    f"{r['train_seconds'] / 60:.1f}",
                    f"{r['evaluate_seconds'] / 60:.1f}",
                ]
            )
    return common.markdown_table(headers, rows)


if __name__ == "__main__":
    main()
