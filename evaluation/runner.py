"""Drive the service in-process over its HTTP routes: ingest, encode, calibrate on valid, score test."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, select
from tqdm import tqdm

from encoder_worker.worker import EncoderWorker
from evaluation.deepmatcher import Benchmark, Pair
from llmatch.client import batches
from llmatch.models import PENDING, Calibration, Dataset, Record
from matching.calibration import CALIBRATION_BINS, brier_score, decision_metrics, expected_calibration_error

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

log = logging.getLogger("llmatch.evaluate")

RECALL_KS = (1, 5, 10, 20, 50)
GRID_INSTRUCTIONS = (
    "Represent the text for finding another product description for the same product",
    "Retrieve semantically similar text",
)


@dataclass(frozen=True)
class EvalConfig:
    encoder: str
    serialization: str = "tagged"
    instruction: str | None = None


@dataclass
class ConfigResult:
    config: EvalConfig
    threshold: float
    valid: dict[str, float]
    test: dict[str, float]
    blocking: dict[str, Any]
    encoding: dict[str, float]
    scores: dict[str, dict[str, list[float]]]  # split -> {"scores", "labels", "probabilities"} for the figures
    calibration: dict[str, Any]  # the probability mapping's method and its error on test

    def summary(self) -> dict[str, Any]:
        """The report.json fields of one configuration (without the raw scores)."""
        return {
            "config": asdict(self.config),
            "threshold": self.threshold,
            "valid": self.valid,
            "test": self.test,
            "blocking": self.blocking,
            "encoding": self.encoding,
            "calibration": self.calibration,
        }


def grid(encoder: str) -> list[EvalConfig]:
    """The reference grid: serialization x instruction."""
    return [EvalConfig(encoder, s, i) for s in ("tagged", "plain") for i in GRID_INSTRUCTIONS]


class Evaluation:
    """One benchmark loaded into a running service (an in-process app over its own database)."""

    def __init__(self, api: TestClient, benchmark: Benchmark):
        self.api = api
        self.benchmark = benchmark
        self.name = benchmark.name
        state = api.app.state.service
        self.worker = EncoderWorker(state.session_factory, state.pool, state.settings)
        self._ingested = False

    def run(self, config: EvalConfig) -> ConfigResult:
        self._configure(config)
        if not self._ingested:
            self._ingest()
        encoding = self._encode()
        self.api.app.state.service.synchronizer.poll()
        threshold, valid = self._calibrate()
        valid_scores, valid_probabilities = self._scores(self.benchmark.valid)
        test_scores, test_probabilities = self._scores(self.benchmark.test)
        test_labels = np.array([p.label for p in self.benchmark.test])
        chosen = decision_metrics(test_scores, test_labels, threshold)
        test = {"precision": chosen.precision, "recall": chosen.recall, "f1": chosen.f1}
        return ConfigResult(
            config=config,
            threshold=threshold,
            valid=valid,
            test=test,
            blocking=self._blocking(),
            encoding=encoding,
            scores={
                "valid": {
                    "scores": valid_scores.tolist(),
                    "labels": [p.label for p in self.benchmark.valid],
                    "probabilities": valid_probabilities.tolist(),
                },
                "test": {
                    "scores": test_scores.tolist(),
                    "labels": test_labels.tolist(),
                    "probabilities": test_probabilities.tolist(),
                },
            },
            calibration={
                "method": self._probability_method(),
                "bins": CALIBRATION_BINS,
                "test": {
                    "ece": expected_calibration_error(test_probabilities, test_labels),
                    "brier": brier_score(test_probabilities, test_labels),
                },
            },
        )

    def _call(self, method: str, url: str, expected: int = 200, **kwargs) -> Any:
        response = self.api.request(method, url, **kwargs)
        if response.status_code != expected:
            raise RuntimeError(f"{method} {url} answered {response.status_code}: {response.text[:300]}")
        return response.json() if response.content else None

    def _configure(self, config: EvalConfig) -> None:
        body = {
            "encoder": config.encoder,
            "serialization": config.serialization,
            "attributes": self.benchmark.attributes,
            "instruction": config.instruction,
        }
        response = self.api.put(f"/datasets/{self.name}", json=body)
        if response.status_code not in (200, 201):
            raise RuntimeError(f"PUT /datasets/{self.name} answered {response.status_code}: {response.text[:300]}")

    def _ingest(self) -> None:
        for source, table in (("a", self.benchmark.table_a), ("b", self.benchmark.table_b)):
            for batch in tqdm(list(batches(table, 1000)), desc=f"ingest {source}", unit=" batches", leave=False):
                self._call("POST", "/records", 202, json={"dataset": self.name, "source": source, "records": batch})
        self._ingested = True

    def _encode(self) -> dict[str, float]:
        """Run the encoder worker until nothing is pending; time it."""
        factory = self.api.app.state.service.session_factory
        with factory() as session:
            pending = session.scalar(select(func.count()).select_from(Record).where(Record.status == PENDING)) or 0
        started = time.perf_counter()
        encoded = cache_hits = 0
        with tqdm(total=pending, desc="encode", unit=" records") as bar:
            while True:
                result = self.worker.run_once()
                if result.claimed == 0:
                    break
                encoded += result.encoded
                cache_hits += result.cache_hits
                bar.update(result.encoded)
        seconds = time.perf_counter() - started
        failed = self._call("GET", f"/datasets/{self.name}")["totals"]["failed"]
        if failed:
            raise RuntimeError(f"{failed} records failed to encode; see GET /records/... for their errors")
        return {
            "records": encoded,
            "from_cache": cache_hits,
            "seconds": round(seconds, 2),
            "records_per_second": round(encoded / seconds, 1) if seconds > 0 else 0.0,
        }

    def _calibrate(self) -> tuple[float, dict[str, float]]:
        pairs = [
            {"left_source": "a", "left_id": p.left_id, "right_source": "b", "right_id": p.right_id, "label": p.label}
            for p in self.benchmark.valid
        ]
        result = self._call("POST", f"/datasets/{self.name}/calibrate", json={"pairs": pairs, "objective": "f1"})
        return result["threshold"], {k: result[k] for k in ("precision", "recall", "f1")}

    def _probability_method(self) -> str:
        """How the active calibration maps scores to probabilities (``platt`` or ``isotonic``)."""
        with self.api.app.state.service.session_factory() as session:
            mapping = session.scalar(
                select(Calibration.probability_model).join(Dataset).where(Dataset.name == self.name)
            )
        return mapping.get("method", "platt")

    def _scores(self, pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
        """The score and the probability ``GET /match`` answers for each pair."""
        scores, probabilities = [], []
        for pair in tqdm(pairs, desc="score pairs", unit=" pairs", leave=False):
            params = {
                "dataset": self.name,
                "left_source": "a",
                "left_id": pair.left_id,
                "right_source": "b",
                "right_id": pair.right_id,
            }
            answer = self._call("GET", "/match", params=params)
            scores.append(answer["score"])
            probabilities.append(answer["probability"])
        return np.array(scores, dtype=np.float64), np.array(probabilities, dtype=np.float64)

    def _blocking(self) -> dict[str, Any]:
        """Recall@k of the test matches among the k nearest b records of their a record."""
        positives = [p for p in self.benchmark.test if p.label == 1]
        wanted: dict[str, set[str]] = defaultdict(set)
        for pair in positives:
            wanted[pair.left_id].add(pair.right_id)
        ranks: list[int | None] = []
        for left_id, rights in tqdm(wanted.items(), desc="candidates", unit=" records", leave=False):
            params = {"dataset": self.name, "source": "a", "id": left_id, "k": max(RECALL_KS), "target_source": "b"}
            found = [c["id"] for c in self._call("GET", "/candidates", params=params)["candidates"]]
            ranks.extend(found.index(r) + 1 if r in found else None for r in rights)
        recall = {str(k): sum(1 for r in ranks if r is not None and r <= k) / len(ranks) for k in RECALL_KS}
        return {
            "recall_at_k": recall,
            "candidates": {str(k): k * len(wanted) for k in RECALL_KS},
            "queries": len(wanted),
            "positives": len(ranks),
            "table_b_records": len(self.benchmark.table_b),
            "note": self.benchmark.subset_note,
        }
