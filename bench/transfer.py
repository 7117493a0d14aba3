"""Transfer: an encoder trained on other benchmarks, evaluated on one it never saw; and one encoder for all.

- **Leave one dataset out**: for each benchmark, ``llmatch train`` on the other ones only (its checkpoint and
  identifier weight chosen on *their* valid pairs), then ``llmatch evaluate`` on the held-out benchmark: its
  threshold and probability mapping are chosen on its own valid.csv: the figure for a user who labels a
  valid.csv but trains on none of their own labels. Each leave-one-out run also reports the figure for a user
  with no labels at all (``carried``): the threshold and probability mapping fitted on the training
  benchmarks' valid pairs (the samples that chose the checkpoint and identifier weight, pooled), applied to
  the held-out benchmark's test scores; none of its labels is used.
- **All together**: one ``llmatch train`` over every benchmark, evaluated on each.

Training sets are sampled to fit a two-core CPU: at most ``--train-pairs`` pairs of each ``train.csv`` and
``--valid-pairs`` of each ``valid.csv`` (stratified, the share of matches kept; the same samples for every run).
Evaluation always uses the full valid.csv (threshold) and test.csv. A finished run's result is reused when the
command is run again (delete ``--work`` to start afresh); trained weights are removed once evaluated.

    python -m bench.transfer --train-pairs 1500 --valid-pairs 500
    python -m bench.transfer --train-pairs 500 --valid-pairs 200 --skip-loo   # the all-together run alone
    python -m bench.transfer --train-pairs 500 --valid-pairs 200 --skip-all --held-out abt_buy   # one of them
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, trained_runs

NAME = "transfer"
BENCHMARKS = ["abt_buy", "dirty_dblp_acm", "dirty_dblp_scholar", "dirty_itunes_amazon", "dirty_walmart_amazon"]


def main() -> None:
    args = parse_args()
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": common.machine()}
    samples = {name: sample(name, args) for name in args.datasets}
    results: dict[str, Any] = {"leave_one_out": {}, "all_together": {}}
    for held_out in [] if args.skip_loo else (args.held_out or args.datasets):
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
    parser.add_argument("--held-out", nargs="+", help="leave out only these (default: each of --datasets)")
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
        if name not in [f.name for f in folders]:  # held out: what a user with no labels of their own gets
            result[name]["carried"] = carried(folders, encoder, args.data / name, work / "eval" / name)
            print(f"{label} on {name}: carried-over threshold, test F1 {result[name]['carried']['test_f1']:.3f}")
    trained_runs.drop_weights(work / "trained")
    work.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2) + "\n")
    return result


def carried(folders: list[Path], encoder: Path, held_out: Path, evaluation: Path) -> dict[str, Any]:
    """The held-out benchmark's test figures with the threshold and probability mapping of the training benchmarks.

    The trained encoder scores the valid pairs of ``folders`` (the samples it was trained and selected on),
    pooled; the F1-maximising threshold and the probability mapping (``fit_probability``, as ``POST /calibrate``)
    fitted on them are applied to the held-out scores in ``evaluation/test_pairs.csv``. As a check that these
    scores are the service's, the same path scores the first ``CHECK_PAIRS`` held-out test pairs again.
    """
    from encoding.recipe import render_options
    from encoding.registry import load_encoder, spec_from_options
    from training import data as training_data

    serialization, instruction = render_options(encoder, None, None)
    model = load_encoder(spec_from_options("carried", encoder), "cpu")
    data = training_data.load(folders, serialization, instruction)
    pairs = data.pairs("valid")
    valid_scores = pair_scores(model, data.inputs, [(p.left, p.right) for p in pairs])
    valid_labels = np.array([p.label for p in pairs])
    test = read_scored_pairs(evaluation / "test_pairs.csv")
    figures = carried_figures(valid_scores, valid_labels, test["scores"], test["labels"])
    check_data = training_data.load([held_out], serialization, instruction)
    name = check_data.names[0]
    keys = [(f"{name}/a/{left}", f"{name}/b/{right}") for left, right in test["ids"][:CHECK_PAIRS]]
    again = pair_scores(model, check_data.inputs, keys)
    figures["score_check_max_difference"] = float(np.max(np.abs(again - test["scores"][: len(keys)])))
    figures["valid_pairs"] = int(valid_labels.size)
    return figures


CHECK_PAIRS = 50  # held-out test pairs scored again outside the service, to check the scores agree


def pair_scores(model: Any, inputs: dict[str, Any], pairs: list[tuple[str, str]]) -> np.ndarray:
    """Cosine of each pair's two records under ``model`` (unit vectors, as the service stores them)."""
    keys = sorted({key for pair in pairs for key in pair})
    vectors = model.encode([inputs[key] for key in keys])
    row = {key: i for i, key in enumerate(keys)}
    return np.array([float(vectors[row[a]] @ vectors[row[b]]) for a, b in pairs], dtype=np.float64)


def read_scored_pairs(path: Path) -> dict[str, Any]:
    """Ids, labels and scores of a ``test_pairs.csv`` written by ``llmatch evaluate``."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {
        "ids": [(r["left_id"], r["right_id"]) for r in rows],
        "labels": np.array([int(r["label"]) for r in rows]),
        "scores": np.array([float(r["score"]) for r in rows], dtype=np.float64),
    }


def carried_figures(
    valid_scores: np.ndarray, valid_labels: np.ndarray, test_scores: np.ndarray, test_labels: np.ndarray
) -> dict[str, Any]:
    """Threshold and probability mapping fitted on the (other benchmarks') valid pairs; test figures with them."""
    from matching.calibration import (
        best_f1_threshold,
        brier_score,
        decision_metrics,
        expected_calibration_error,
        fit_probability,
        probabilities,
    )

    choice = best_f1_threshold(valid_scores, valid_labels)
    mapping = fit_probability(valid_scores, valid_labels)
    test = decision_metrics(test_scores, test_labels, choice.threshold)
    predicted = probabilities(mapping, test_scores)
    return {
        "threshold": choice.threshold,
        "valid_f1": choice.f1,
        "probability_method": mapping["method"],
        "test_precision": test.precision,
        "test_recall": test.recall,
        "test_f1": test.f1,
        "test_ece": expected_calibration_error(predicted, test_labels),
        "test_brier": brier_score(predicted, test_labels),
    }


def markdown(results: dict[str, Any], datasets: list[str]) -> str:
    headers = ["benchmark", "trained on", "identifier weight", "threshold", "valid F1", "test P", "test R", "test F1"]
    headers += ["test ECE", "train (min)", "evaluate (min)"]
    headers += ["no own labels: threshold", "test P", "test R", "test F1", "test ECE"]
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
                    *carried_cells(r.get("carried")),
                ]
            )
    return common.markdown_table(headers, rows)


def carried_cells(carried: dict[str, Any] | None) -> list[str]:
    """The columns of the threshold and mapping carried over from the training benchmarks ("-" when not run)."""
    if carried is None:
        return ["-"] * 5
    keys = ("threshold", "test_precision", "test_recall")
    return [*(f"{carried[k]:.3f}" for k in keys), f"**{carried['test_f1']:.3f}**", f"{carried['test_ece']:.3f}"]


if __name__ == "__main__":
    main()
