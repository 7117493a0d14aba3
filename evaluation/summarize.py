"""Combine evaluation reports into one Markdown table next to the reference results.

Usage: python -m evaluation.summarize eval-out/minilm/*/report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# LLM2Vec Mistral-7B, cosine + threshold, F1 on test (the result this project set out to beat).
REFERENCE_F1 = {
    "abt_buy": 0.57,
    "dirty_itunes_amazon": 0.95,
    "dirty_dblp_acm": 0.97,
    "dirty_dblp_scholar": 0.90,
    "dirty_walmart_amazon": 0.53,
}


def row(report: dict) -> str:
    config = report["config"]
    instruction = config["instruction"] or "-"
    reference = REFERENCE_F1.get(report["dataset"])
    recall = report["blocking"]["recall_at_k"]
    weight = report.get("identifier_weight")
    encoder = config["encoder"] + (f" (identifier weight {weight:g})" if weight else "")
    return (
        f"| {report['dataset']} | {encoder} | {config['serialization']} | {instruction} "
        f"| {report['threshold']:.3f} | {report['valid']['f1']:.3f} | {report['test']['precision']:.3f} "
        f"| {report['test']['recall']:.3f} | **{report['test']['f1']:.3f}** "
        f"| {reference if reference is not None else '-'} | {recall['1']:.3f} | {recall['10']:.3f} "
        f"| {recall['50']:.3f} | {report['encoding']['records_per_second']:.0f} | {report['seconds'] / 60:.1f} "
        f"| {'yes' if report['blocking'].get('note') else ''} |"
    )


def table(paths: list[Path]) -> str:
    reports = [json.loads(path.read_text()) for path in paths]
    header = (
        "| dataset | encoder | serialization | instruction | threshold | valid F1 | test P | test R | test F1 "
        "| reference F1 | recall@1 | recall@10 | recall@50 | records/s | run (min) | tableB subset |"
    )
    return "\n".join([header, "|" + "---|" * 16, *(row(r) for r in reports)]) + "\n"


if __name__ == "__main__":
    print(table([Path(p) for p in sys.argv[1:]]), end="")
