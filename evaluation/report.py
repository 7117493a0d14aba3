"""Writing an evaluation: report.json, report.md and one PNG figure per dataset."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation.deepmatcher import Pair  # noqa: E402
from evaluation.runner import RECALL_KS, ConfigResult  # noqa: E402
from matching.calibration import calibration_bins, decision_metrics  # noqa: E402

# (decided a match, label) -> the outcome test_pairs.csv names, in the order tables list them.
OUTCOMES = {(True, 1): "true match", (False, 1): "missed match", (True, 0): "false match", (False, 0): "non-match"}


def report_dict(
    dataset: str, selected: ConfigResult, tried: list[ConfigResult], meta: dict[str, Any]
) -> dict[str, Any]:
    report = {"dataset": dataset, **selected.summary(), **meta}
    if len(tried) > 1:
        report["selection"] = "configuration with the highest valid F1 (test figures never used to choose)"
        report["tried"] = [result.summary() for result in tried]
    return report


def write(out: Path, report: dict[str, Any], selected: ConfigResult, splits: dict[str, Sequence[Pair]]) -> list[Path]:
    """report.json, report.md, the figures and ``SPLIT_pairs.csv`` for each of ``splits`` (valid, test)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    figure = out / f"{report['dataset']}.png"
    plot(selected, report["dataset"], figure, _identifier_text(report))
    reliability = out / f"{report['dataset']}-reliability.png"
    plot_reliability(selected, report["dataset"], reliability)
    written = [out / "report.json", out / "report.md", figure, reliability]
    for split, pairs in splits.items():
        written.append(out / f"{split}_pairs.csv")
        write_pairs(written[-1], selected, split, pairs)
    return written


def write_pairs(path: Path, result: ConfigResult, split: str, pairs: Sequence[Pair]) -> None:
    """Every pair of a split with its score, probability and the decision at the chosen threshold, for reading
    the errors (on valid; test only to report)."""
    scored = result.scores[split]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["left_id", "right_id", "label", "score", "probability", "decision", "outcome"])
        for pair, score, chance in zip(pairs, scored["scores"], scored["probabilities"], strict=True):
            decided = score >= result.threshold
            outcome = OUTCOMES[(decided, pair.label)]
            writer.writerow(
                [pair.left_id, pair.right_id, pair.label, f"{score:.6f}", f"{chance:.6f}", int(decided), outcome]
            )


def _config_text(config: dict[str, Any]) -> str:
    instruction = config.get("instruction")
    return f"{config['encoder']}, {config['serialization']}, " + (
        f'"{instruction}"' if instruction else "no instruction"
    )


def _identifier_text(report: dict[str, Any]) -> str:
    weight = report.get("identifier_weight")
    return f", identifier weight {weight:g}" if weight else ""


def markdown(report: dict[str, Any]) -> str:
    blocking = report["blocking"]
    lines = [
        f"# Evaluation: {report['dataset']}",
        "",
        f"Configuration: {_config_text(report['config'])}{_identifier_text(report)}. "
        f"Threshold chosen on valid: **{report['threshold']:.4f}**.",
        "",
        "| split | precision | recall | F1 |",
        "|---|---:|---:|---:|",
        *(
            "| {} | {precision:.3f} | {recall:.3f} | {f1:.3f} |".format(split, **report[split])
            for split in ("valid", "test")
        ),
        *_calibration_lines(report),
        "",
        f"Blocking: recall of the {blocking['positives']} test matches among the k nearest `b` records of their "
        f"`a` record ({blocking['queries']} queries over {blocking['table_b_records']:,} `b` records).",
        "",
        "| k | " + " | ".join(str(k) for k in RECALL_KS) + " |",
        "|---|" + "---:|" * len(RECALL_KS),
        "| recall@k | " + " | ".join(f"{blocking['recall_at_k'][str(k)]:.3f}" for k in RECALL_KS) + " |",
        "| candidate pairs | " + " | ".join(f"{blocking['candidates'][str(k)]:,}" for k in RECALL_KS) + " |",
    ]
    if blocking.get("note"):
        lines += ["", f"**Note:** {blocking['note']}."]
    encoding = report["encoding"]
    lines += [
        "",
        f"Encoding: {encoding['records']:,} records in {encoding['seconds']:.1f} s "
        f"({encoding['records_per_second']:.1f} records/s, {encoding['from_cache']:,} from the cache).",
    ]
    if "tried" in report:
        lines += [
            "",
            "## Configurations tried (selected on valid F1)",
            "",
            "| serialization | instruction | threshold | valid F1 | test F1 |",
            "|---|---|---:|---:|---:|",
        ]
        for tried in report["tried"]:
            config = tried["config"]
            lines.append(
                f"| {config['serialization']} | {config['instruction'] or '-'} | {tried['threshold']:.4f} "
                f"| {tried['valid']['f1']:.3f} | {tried['test']['f1']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _calibration_lines(report: dict[str, Any]) -> list[str]:
    calibration = report.get("calibration")
    if not calibration:
        return []
    test = calibration["test"]
    return [
        "",
        f"Probabilities (what `GET /match` answers; {calibration['method']} mapping fitted on valid): on test, "
        f"expected calibration error **{test['ece']:.3f}** ({calibration['bins']} equal-width bins), "
        f"Brier score {test['brier']:.3f}.",
    ]


def plot_reliability(result: ConfigResult, dataset: str, path: Path) -> None:
    """Reliability diagram of the test probabilities: share of matches against mean probability per bin."""
    probabilities = np.array(result.scores["test"]["probabilities"])
    labels = np.array(result.scores["test"]["labels"])
    bins = calibration_bins(probabilities, labels, result.calibration["bins"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    left.plot(
        [b["mean_probability"] for b in bins],
        [b["match_rate"] for b in bins],
        marker="o",
        color="tab:blue",
        label=f"test pairs per bin (ECE {result.calibration['test']['ece']:.3f})",
    )
    for b in bins:
        left.annotate(
            str(b["pairs"]),
            (b["mean_probability"], b["match_rate"]),
            fontsize=7,
            xytext=(3, -9),
            textcoords="offset points",
        )
    left.set(
        xlabel="mean probability in the bin",
        ylabel="share of matches",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"Test: reliability ({result.calibration['bins']} equal-width bins)",
    )
    left.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, result.calibration["bins"] + 1)
    for label, name, color in ((0, "non-matches", "tab:red"), (1, "matches", "tab:green")):
        right.hist(probabilities[labels == label], bins=edges, histtype="step", linewidth=1.5, label=name, color=color)
    right.set(xlabel="probability", ylabel="test pairs", yscale="log", title="Test: probabilities")
    right.legend(fontsize=8)
    figure.suptitle(f"{dataset}: {result.calibration['method']} mapping fitted on valid", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot(result: ConfigResult, dataset: str, path: Path, encoder_note: str = "") -> None:
    """Test precision/recall/F1 against the threshold (valid's choice marked) and the score distributions."""
    scores = np.array(result.scores["test"]["scores"])
    labels = np.array(result.scores["test"]["labels"])
    thresholds = np.linspace(max(scores.min() - 0.02, -1), min(scores.max() + 0.02, 1), 300)
    curves = [decision_metrics(scores, labels, float(t)) for t in thresholds]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    accepting = np.array([(scores >= t).any() for t in thresholds])  # precision is undefined past the top score
    for name, color in (("precision", "tab:blue"), ("recall", "tab:orange"), ("f1", "tab:green")):
        values = np.array([getattr(c, name) for c in curves])
        values = np.where(accepting, values, np.nan) if name == "precision" else values
        left.plot(thresholds, values, label=name if name != "f1" else "F1", color=color)
    left.axvline(
        result.threshold,
        color="black",
        linestyle="--",
        label=f"threshold from valid = {result.threshold:.3f}\n(test F1 {result.test['f1']:.3f})",
    )
    left.set(xlabel="cosine threshold", ylabel="test metric", ylim=(0, 1.02), title="Test: decisions by threshold")
    left.legend(loc="lower left", fontsize=8)
    bins = np.linspace(thresholds[0], thresholds[-1], 50)
    for label, name, color in ((0, "non-matches", "tab:red"), (1, "matches", "tab:green")):
        chosen = scores[labels == label]
        right.hist(chosen, bins=bins, alpha=0.6, density=True, label=f"{name} ({chosen.size})", color=color)
    right.axvline(result.threshold, color="black", linestyle="--")
    right.set(xlabel="cosine similarity", ylabel="density", title="Test: score distributions")
    right.legend(fontsize=8)
    figure.suptitle(f"{dataset}: {_config_text(asdict_config(result))}{encoder_note}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def asdict_config(result: ConfigResult) -> dict[str, Any]:
    return {
        "encoder": result.config.encoder,
        "serialization": result.config.serialization,
        "instruction": result.config.instruction,
    }
