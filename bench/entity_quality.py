"""Entity quality: pairwise precision, recall and F1 of entities against the labelled pairs of DeepMatcher
benchmarks, and the largest entity, for plain connected components and the guards against long chains.

In this process, with the code the service runs when it groups a dataset (``matching.pairs.candidate_pairs``,
``matching.grouping.group``): the records that valid and test pairs reference (``--records-of``) are rendered as
the service renders them (tagged, the tables' column order) and embedded with untrained MiniLM (kept in bench/out
for the next run); links are each record's ``--k`` candidates in the other table at or above the threshold, which
is calibrated on ``valid.csv`` (as ``llmatch evaluate`` does). A labelled pair counts as predicted a match when
both records share an entity. The guard is chosen on valid F1; test is reported beside it. The baselines, in the
same run: the pairwise decision ``score >= threshold`` that the entities are built from, and plain connected
components.

    python -m bench.entity_quality --datasets abt_buy dirty_walmart_amazon --skip-columns description
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

try:
    from bench import common, labelled
except ModuleNotFoundError:
    import common  # type: ignore[no-redef]
    import labelled  # type: ignore[no-redef]

from encoding.render import RenderConfig, render
from matching.calibration import best_f1_threshold, decision_metrics, precision_recall_f1
from matching.grouping import Guard, group
from matching.pairs import EncodedRecords, candidate_pairs

NAME = "entity_quality"
GUARDS = {
    "connected components": Guard("none", max_size=0),
    "size cap 2": Guard("none", max_size=2),
    "size cap 5": Guard("none", max_size=5),
    "centroid": Guard("centroid", max_size=0),
    "support 0.25": Guard("support", 0.25, max_size=0),
    "support 0.5": Guard("support", 0.5, max_size=0),
    "support 0.75": Guard("support", 0.75, max_size=0),
    "support 1.0 (complete linkage)": Guard("support", 1.0, max_size=0),
    "size cap 3": Guard("none", max_size=3),
    "support 0.5, size cap 3 (the default)": Guard("support", 0.5, max_size=3),
    "support 1.0, size cap 5": Guard("support", 1.0, max_size=5),
}


def main() -> None:
    args = parse_args()
    pool = common.load_encoder_pool()
    results = {
        name: run_benchmark(pool, labelled.load_benchmark(args.data / name, args.skip_columns), args.k, args.records_of)
        for name in args.datasets
    }
    report = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": common.machine(), "results": results}
    common.publish(args.out, report, markdown(results))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["abt_buy", "dirty_walmart_amazon"])
    parser.add_argument("--data", type=Path, default=common.DATASETS_DIR)
    parser.add_argument("--k", type=int, default=10, help="candidates per record (LLMATCH_ENTITY_CANDIDATES)")
    parser.add_argument(
        "--records-of",
        nargs="+",
        default=["valid", "test"],
        choices=["train", "valid", "test"],
        help="embed the records these splits reference (add train for more distractors; slower on a CPU)",
    )
    parser.add_argument(
        "--skip-columns", nargs="*", default=[], help="columns left out of the records (e.g. long descriptions)"
    )
    parser.add_argument("--out", type=Path, default=common.default_out(NAME))
    return parser.parse_args()


def run_benchmark(pool: Any, benchmark: labelled.Benchmark, k: int, splits: list[str]) -> dict[str, Any]:
    refs = sorted(benchmark.referenced(*splits))
    config = RenderConfig("tagged", benchmark.columns, None)
    texts = [render(benchmark.tables[source][rid], config, benchmark.columns) for source, rid in refs]
    began = time.perf_counter()
    vectors = _embed(pool, texts)
    encode_seconds = time.perf_counter() - began
    records = EncodedRecords(
        ids=np.arange(len(refs), dtype=np.int64),
        sources=[source for source, _ in refs],
        external_ids=[rid for _, rid in refs],
        embedding_ids=np.arange(len(refs), dtype=np.int64),
        vectors=vectors,
    )
    row = {ref: i for i, ref in enumerate(refs)}
    valid, test = benchmark.pairs("valid"), benchmark.pairs("test")
    valid_scores = np.array([float(vectors[row[a]] @ vectors[row[b]]) for a, b in valid])
    threshold = best_f1_threshold(valid_scores, np.array(list(valid.values()))).threshold
    pairs = candidate_pairs(records, k)
    links = [(score, i, j) for (i, j), score in pairs.items() if score >= threshold]
    out: dict[str, Any] = {
        "records": len(refs),
        "links": len(links),
        "threshold": threshold,
        "encode_s": encode_seconds,
    }
    out["pairwise decision"] = {
        split: _decision(vectors, row, labels, threshold) for split, labels in (("valid", valid), ("test", test))
    }
    for name, guard in GUARDS.items():
        began = time.perf_counter()
        groups = group(records.vectors, links, threshold, guard)
        seconds = time.perf_counter() - began
        entity = {r: g for g, members in enumerate(groups) for r in members}
        out[name] = {
            "valid": _pairwise(entity, row, valid),
            "test": _pairwise(entity, row, test),
            "largest": max(len(g) for g in groups),
            "entities_2plus": sum(len(g) >= 2 for g in groups),
            "seconds": seconds,
        }
    return out


def _embed(pool: Any, texts: list[str]) -> np.ndarray:
    """MiniLM vectors of the texts, kept in bench/out so that a second run does not encode again."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = common.OUT_DIR / f"{NAME}-vectors-{digest}.npy"
    if path.exists():
        return np.load(path)
    vectors = pool.encode(common.ENCODER, common.encoder_inputs(texts))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def _pairwise(entity: dict[int, int], row: dict, labels: dict) -> dict[str, float]:
    predicted = np.array([entity[row[a]] == entity[row[b]] for a, b in labels])
    truth = np.array(list(labels.values())) == 1
    precision, recall, f1 = precision_recall_f1(predicted, truth)
    return {"precision": precision, "recall": recall, "f1": f1}


def _decision(vectors: np.ndarray, row: dict, labels: dict, threshold: float) -> dict[str, float]:
    scores = np.array([float(vectors[row[a]] @ vectors[row[b]]) for a, b in labels])
    choice = decision_metrics(scores, np.array(list(labels.values())), threshold)
    return {"precision": choice.precision, "recall": choice.recall, "f1": choice.f1}


def markdown(results: dict[str, Any]) -> str:
    headers = [
        "benchmark",
        "grouping",
        "valid P",
        "valid R",
        "valid F1",
        "test P",
        "test R",
        "test F1",
        "test F1 / components",
        "largest entity",
        "entities (2+)",
    ]
    rows = []
    for name, result in results.items():
        base = result["connected components"]["test"]["f1"]
        decision = result["pairwise decision"]
        rows.append(
            [
                name,
                "pairwise decision (score >= threshold)",
                *_cells(decision["valid"]),
                *_cells(decision["test"]),
                "",
                "",
                "",
            ]
        )
        best = max(GUARDS, key=lambda g: result[g]["valid"]["f1"])
        for guard in GUARDS:
            r = result[guard]
            label = f"**{guard}** (best on valid)" if guard == best else guard
            ratio = r["test"]["f1"] / base if base else float("nan")
            rows.append(
                [
                    name,
                    label,
                    *_cells(r["valid"]),
                    *_cells(r["test"]),
                    f"{ratio:.2f}",
                    r["largest"],
                    r["entities_2plus"],
                ]
            )
    return common.markdown_table(headers, rows)


def _cells(metrics: dict[str, float]) -> list[str]:
    return [f"{metrics['precision']:.3f}", f"{metrics['recall']:.3f}", f"{metrics['f1']:.3f}"]


if __name__ == "__main__":
    main()
