"""The learning curve: an oracle plays the user of a running service, and test F1 follows the labels it gives.

For each benchmark and seed, one `llmatch serve` (SQLite, embedded worker, `LLMATCH_TRAINING_SEED=SEED`) holds
one dataset per strategy, each with the benchmark's two tables as sources `a` and `b`. Then, per strategy, for
each budget in turn:

- `review`: the oracle answers the pairs `GET /datasets/NAME/review` asks about, a page at a time, until the
  dataset holds `budget` labels; `random`: the next pairs of `train.csv` in a seeded order, up to `budget`.
  The oracle is the closed world: a pair is a match iff the benchmark lists it as a match in any split. Pairs of
  `test.csv` are never labelled: the review pairs that are test pairs are passed over.
- `POST /datasets/NAME/train`, waited for (its seconds, status, held-out metrics and whether it was adopted are
  kept). When it is refused (too few labels) or its version is not adopted, the threshold is fitted from the
  stored labels instead (`POST /calibrate {"from": "labels"}`), as a user would.
- test F1 from the `/match` decisions (batch form) on every pair of `test.csv`; on `valid.csv`, the F1 of the
  same decisions and of valid's own best threshold on the same scores (what the threshold costs, read where
  choices may be made).

Each job's adoption is audited on valid.csv (`bench/judge_audit.py`): the serving version's valid scores are read
before the job, the candidate's after it (from its folder when it was not adopted: the server keeps rejected
versions, and the benchmark deletes each once read), and the table says how often the held-out F1 rule and the
held-out average-precision rule chose the version valid.csv prefers.

While each job runs, a probe sends `GET /match` on one stored pair every 50 ms; its latencies during jobs are
reported beside those of the same probe on the idle service before the first job.

    python -m bench.learning --datasets abt_buy dirty_walmart_amazon --budgets 50 100 200 400 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import common, judge_audit
from bench.common import interval
from encoding.versions import remove_version
from evaluation import deepmatcher
from llmatch.settings import Settings
from matching.calibration import best_f1_threshold, precision_recall_f1

NAME = "learning"
PROBE_EVERY = 0.05  # seconds between the probe's GET /match requests
LABEL_FIELDS = ("left_source", "left_id", "right_source", "right_id", "label")  # a row's labels, in this order
PAGE = 20  # review pairs asked for at a time (plus those passed over)


@dataclass
class Oracle:
    """The closed world of a benchmark: its matches over every split, and the test pairs nobody may label."""

    matches: set[tuple[str, str]]
    test_pairs: set[tuple[str, str]]

    @classmethod
    def of(cls, benchmark: deepmatcher.Benchmark) -> Oracle:
        matches = {(p.left_id, p.right_id) for pairs in benchmark.splits.values() for p in pairs if p.label == 1}
        return cls(matches, {(p.left_id, p.right_id) for p in benchmark.test})

    def answer(self, pair: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, str] | None]:
        """The label of a review pair, and its (a id, b id) when it crosses the sources (None otherwise)."""
        sides = {pair["left"]["source"]: pair["left"]["id"], pair["right"]["source"]: pair["right"]["id"]}
        ref = (sides["a"], sides["b"]) if set(sides) == {"a", "b"} else None
        body = {
            "left_source": pair["left"]["source"],
            "left_id": pair["left"]["id"],
            "right_source": pair["right"]["source"],
            "right_id": pair["right"]["id"],
            "label": int(ref in self.matches),
        }
        return body, ref


@dataclass
class Probe:
    """GET /match on one stored pair every ``PROBE_EVERY`` seconds, each answer tagged with the phase it fell in."""

    client: httpx.Client
    query: dict[str, str]
    phase: str = "idle"
    samples: list[tuple[str, float, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.wait(PROBE_EVERY):
            began = time.perf_counter()
            try:
                status = self.client.get("/match", params=self.query).status_code
            except httpx.HTTPError:
                status = 0
            self.samples.append((self.phase, time.perf_counter() - began, status))

    def summary(self, phase: str) -> dict[str, Any]:
        seconds = [s for p, s, _ in self.samples if p == phase]
        failed = sum(1 for p, _, status in self.samples if p == phase and status != 200)
        return {**(common.summarize(seconds) if seconds else {"n": 0}), "not_200": failed}


def main() -> None:
    args = parse_args()
    if args.merge:
        merge(args)
        return
    report: dict[str, Any] = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": common.machine()}
    runs: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    benchmarks = {name: deepmatcher.load(args.data / name) for name in args.datasets}
    # seeds outermost: a run stopped early still covers every benchmark
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for name, benchmark in benchmarks.items():
            found, probe = run_seed(benchmark, seed, args)
            runs += found
            probes.append({"dataset": name, "seed": seed, "idle": probe.summary("idle"), "job": probe.summary("job")})
            common.write_report(args.out, {**report, "runs": runs, "probes": probes})
    report |= {"runs": runs, "probes": probes}
    table = tables(runs, probes, args)
    figure(runs, args)
    report["figure"] = str(args.figure)
    common.publish(args.out, report, table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["abt_buy", "dirty_walmart_amazon", "dirty_dblp_scholar"])
    parser.add_argument("--data", type=Path, default=common.DATASETS_DIR)
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="run seeds FIRST_SEED to FIRST_SEED+SEEDS-1 (--merge joins runs)"
    )
    parser.add_argument("--strategies", nargs="+", choices=("review", "random"), default=["review", "random"])
    parser.add_argument("--job-timeout", type=float, default=1800.0, help="seconds to wait for one training job")
    parser.add_argument("--out", type=Path, default=common.default_out(NAME))
    parser.add_argument("--figure", type=Path, default=common.REPO_ROOT / "docs" / "figures" / "learning_curve.png")
    parser.add_argument("--logs", type=Path, default=None, help="keep each server's log in this folder")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="run nothing: read these reports (of runs made separately), print their tables, draw one figure",
    )
    return parser.parse_args()


def merge(args: argparse.Namespace) -> None:
    """The tables and the figure of reports written by separate runs (e.g. one benchmark each)."""
    runs: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    for path in args.merge:
        report = json.loads(path.read_text())
        runs += report["runs"]
        probes += report["probes"]
    args.datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    args.budgets = sorted({r["budget"] for r in runs})
    print(tables(runs, probes, args))
    figure(runs, args)
    print(f"\nwrote {args.figure}")


def run_seed(benchmark: deepmatcher.Benchmark, seed: int, args: argparse.Namespace) -> tuple[list[dict], Probe]:
    """Every strategy's curve for one seed, on one fresh server; returns the rows and the latency probe."""
    oracle = Oracle.of(benchmark)
    rows: list[dict[str, Any]] = []
    env = {"LLMATCH_TRAINING_SEED": str(seed), "LLMATCH_KEEP_REJECTED_VERSIONS": "1"}  # judge_audit reads them
    log = args.logs / f"{benchmark.name}-{seed}.log" if args.logs else None
    server = common.Server(extra_env=env, log_copy=log)
    with server, server.client() as client, server.client() as probe_client:
        datasets = {strategy: f"{benchmark.name[:40]}-{strategy}-{seed}" for strategy in args.strategies}
        for dataset in datasets.values():  # all ingested first: the untrained vectors are encoded once, shared
            ingest(client, dataset, benchmark)
        for dataset in datasets.values():
            common.wait_encoded(client, len(benchmark.table_a) + len(benchmark.table_b), 3600, dataset=dataset)
        first = benchmark.test[0]
        query = {"dataset": next(iter(datasets.values())), "left_source": "a", "left_id": first.left_id}
        probe = Probe(probe_client, query | {"right_source": "b", "right_id": first.right_id})
        thread = threading.Thread(target=probe.run, daemon=True)
        thread.start()
        time.sleep(15)  # the idle baseline
        try:
            for strategy, dataset in datasets.items():
                probe.query["dataset"] = dataset
                models = server.data_dir / "models"
                rows += curve(client, dataset, strategy, benchmark, oracle, seed, probe, args, models)
        finally:
            probe.stop.set()
            thread.join()
    return rows, probe


def ingest(client: httpx.Client, dataset: str, benchmark: deepmatcher.Benchmark) -> None:
    common.check(client.put(f"/datasets/{dataset}", json={"attributes": benchmark.attributes}), 201)
    for source, table in (("a", benchmark.table_a), ("b", benchmark.table_b)):
        common.post_records(client, source, table, 1000, dataset=dataset)


def curve(
    client: httpx.Client,
    dataset: str,
    strategy: str,
    benchmark: deepmatcher.Benchmark,
    oracle: Oracle,
    seed: int,
    probe: Probe,
    args: argparse.Namespace,
    models_dir: Path,
) -> list[dict[str, Any]]:
    rows = []
    checked = False  # the first adopted version's kept-folder scores are checked against the served ones
    shuffled = list(benchmark.splits["train"])
    random.Random(seed).shuffle(shuffled)
    for budget in sorted(args.budgets):
        if strategy == "review":
            label_review_pairs(client, dataset, oracle, budget)
        else:
            pairs = [_pair_body(p) for p in shuffled[:budget]]
            common.check(client.put(f"/datasets/{dataset}/labels", json={"pairs": pairs}))
        labels = common.check(client.get(f"/datasets/{dataset}/labels")).json()["pairs"]
        before = match_answers(client, dataset, benchmark.valid)[0]
        probe.phase = "job"
        try:
            job = train(client, dataset, args.job_timeout)
        finally:
            probe.phase = "between"
        if job.get("status") != "done" or not job.get("adopted"):
            client.post(f"/datasets/{dataset}/calibrate", json={"from": "labels", "objective": "f1"})
        figures = valid_f1(client, dataset, benchmark) | test_f1(client, dataset, benchmark)
        audited = audit_job(client, dataset, benchmark, job, before, models_dir, check=not checked)
        checked = checked or bool(audited and "score_check_max_abs_diff" in audited)
        row = {
            "dataset": benchmark.name,
            "strategy": strategy,
            "seed": seed,
            "budget": budget,
            "labels": len(labels),
            "matches": sum(x["label"] for x in labels),
            "job_status": job.get("status"),
            "refused": job.get("detail"),
            "adopted": job.get("adopted"),
            "version": job.get("version"),
            "job_seconds": job.get("seconds"),
            "holdout": job.get("metrics"),
            "labelled": [[x[k] for k in LABEL_FIELDS] for x in labels],
            "judge_audit": audited,
            **figures,
        }
        print(
            f"{benchmark.name} {strategy} seed {seed} budget {budget}: {row['labels']} labels "
            f"({row['matches']} matches), job {row['job_status']} adopted {row['adopted']} "
            f"in {row['job_seconds']} s, test F1 {row['test_f1']:.3f}",
            flush=True,
        )
        rows.append(row)
    return rows


def audit_job(
    client: httpx.Client,
    dataset: str,
    benchmark: deepmatcher.Benchmark,
    job: dict[str, Any],
    before: np.ndarray,
    models_dir: Path,
    check: bool,
) -> dict[str, Any] | None:
    """valid.csv against the job's held-out judgement (``bench/judge_audit.py``); a rejected version's kept folder
    is read, then deleted. ``check``: an adopted version's scores from its folder must equal the served ones."""
    metrics = job.get("metrics") or {}
    if job.get("status") != "done" or not metrics.get("candidate", {}).get("f1"):
        return None  # refused, failed, or nothing to judge on
    rendering = common.check(client.get(f"/datasets/{dataset}")).json()
    max_chars = Settings().max_text_chars

    def kept() -> np.ndarray:
        return judge_audit.kept_version_scores(models_dir, job["version"], benchmark, rendering, max_chars)

    truth = np.array([p.label for p in benchmark.valid])
    if not job.get("adopted"):
        candidate = kept()
        remove_version(models_dir, job["version"])
        return judge_audit.audit(metrics, before, candidate, truth)
    served = match_answers(client, dataset, benchmark.valid)[0]
    row = judge_audit.audit(metrics, before, served, truth)
    if check:
        row["score_check_max_abs_diff"] = float(np.max(np.abs(kept() - served)))
    return row


def label_review_pairs(client: httpx.Client, dataset: str, oracle: Oracle, budget: int) -> None:
    """Answer review pages until the dataset holds ``budget`` labels (or the review has nothing left to ask)."""
    passed_over: set[tuple[str, str]] = set()
    while True:
        stored = common.check(client.get(f"/datasets/{dataset}/labels")).json()["total"]
        needed = budget - stored
        if needed <= 0:
            return
        page = common.check(
            client.get(f"/datasets/{dataset}/review", params={"limit": min(PAGE, needed) + len(passed_over)})
        ).json()["pairs"]
        answers = []
        for pair in page:
            body, ref = oracle.answer(pair)
            if ref in oracle.test_pairs:
                passed_over.add(ref)
                continue
            answers.append(body)
            if len(answers) == needed:
                break
        if not answers:
            return
        common.check(client.put(f"/datasets/{dataset}/labels", json={"pairs": answers}))


def _pair_body(pair: deepmatcher.Pair) -> dict[str, Any]:
    return {
        "left_source": "a",
        "left_id": pair.left_id,
        "right_source": "b",
        "right_id": pair.right_id,
        "label": pair.label,
    }


def train(client: httpx.Client, dataset: str, timeout: float) -> dict[str, Any]:
    """Start a training job and wait for its end; a refusal comes back as ``{"status": "refused", "detail"}``."""
    began = time.monotonic()
    started = client.post(f"/datasets/{dataset}/train", json={})
    if started.status_code == 409:
        return {"status": "refused", "detail": started.json()["detail"]}
    common.check(started, 202)
    while time.monotonic() - began < timeout:
        job = common.check(client.get(f"/datasets/{dataset}/train")).json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job | {"seconds": round(time.monotonic() - began, 1)}
        time.sleep(1.0)
    raise TimeoutError(f"training job of {dataset} not finished after {timeout:.0f} s")


def test_f1(client: httpx.Client, dataset: str, benchmark: deepmatcher.Benchmark) -> dict[str, float]:
    """Precision, recall and F1 of the service's decisions on every pair of test.csv."""
    scores, predicted, threshold = match_answers(client, dataset, benchmark.test)
    truth = np.array([p.label == 1 for p in benchmark.test])
    precision, recall, f1 = precision_recall_f1(predicted, truth)
    return {"test_f1": f1, "test_precision": precision, "test_recall": recall, "threshold": threshold}


def valid_f1(client: httpx.Client, dataset: str, benchmark: deepmatcher.Benchmark) -> dict[str, float]:
    """F1 on valid.csv of the service's decisions and of valid's own best threshold on the same scores: the
    threshold's cost, read where choices may be made. Review labels may include valid pairs (only test pairs are
    passed over)."""
    scores, predicted, _ = match_answers(client, dataset, benchmark.valid)
    truth = np.array([p.label == 1 for p in benchmark.valid])
    served = precision_recall_f1(predicted, truth)[2]
    return {"valid_f1": served, "valid_best_f1": best_f1_threshold(scores, truth.astype(int)).f1}


def match_answers(
    client: httpx.Client, dataset: str, pairs: list[deepmatcher.Pair]
) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Scores, decisions and threshold of ``/match`` (batch form) on the pairs."""
    body = [{"left": {"source": "a", "id": p.left_id}, "right": {"source": "b", "id": p.right_id}} for p in pairs]
    results: list[dict[str, Any]] = []
    for start in range(0, len(body), 10_000):
        answer = client.post("/match", json={"dataset": dataset, "pairs": body[start : start + 10_000]})
        results += common.check(answer).json()["results"]
    scores = np.array([r.get("score", -np.inf) for r in results], dtype=np.float64)
    predicted = np.array([bool(r.get("match")) for r in results])
    return scores, predicted, next((r.get("threshold") for r in results if "threshold" in r), None)


def tables(runs: list[dict[str, Any]], probes: list[dict[str, Any]], args: argparse.Namespace) -> str:
    parts = [markdown(runs, args), valid_table(runs, args), timing_table(runs, args), probe_table(probes)]
    return "\n\n".join([*parts, judge_audit.markdown(runs, args.datasets, args.budgets)])


def markdown(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    headers = ["benchmark", "labels", "review: test F1 (95% CI)", "random: test F1 (95% CI)"]
    headers += ["review − random (paired, 95% CI)", "seeds", "matches labelled (review / random)", "job minutes"]
    rows = []
    for name in args.datasets:
        for budget in sorted(args.budgets):
            arms = {s: _by_seed(runs, name, s, budget) for s in ("review", "random")}
            if not arms["review"] or not arms["random"]:
                continue
            seeds = sorted(set(arms["review"]) & set(arms["random"]))
            review = np.array([arms["review"][s]["test_f1"] for s in seeds])
            rand = np.array([arms["random"][s]["test_f1"] for s in seeds])
            minutes = [r["job_seconds"] / 60 for a in arms.values() for r in a.values() if r["job_seconds"]]
            matches = [np.mean([r["matches"] for r in arms[s].values()]) for s in ("review", "random")]
            rows.append(
                [
                    name,
                    budget,
                    "{:.3f} ± {:.3f}".format(*interval(review)),
                    "{:.3f} ± {:.3f}".format(*interval(rand)),
                    "{:+.3f} ± {:.3f}".format(*interval(review - rand)),
                    len(seeds),
                    f"{matches[0]:.0f} / {matches[1]:.0f}",
                    f"{np.mean(minutes):.1f}" if minutes else "",
                ]
            )
    return common.markdown_table(headers, rows)


def valid_table(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """valid.csv F1 of the served decisions against valid's own best threshold on the same versions."""
    headers = ["benchmark", "labels", "strategy", "valid F1: served threshold", "valid's best threshold"]
    headers += ["served − best (paired, 95% CI)", "versions"]
    rows = []
    for name in args.datasets:
        for budget in sorted(args.budgets):
            for strategy in ("review", "random"):
                found = [r for r in _by_seed(runs, name, strategy, budget).values() if "valid_f1" in r]
                if not found:
                    continue
                served = np.array([r["valid_f1"] for r in found])
                best = np.array([r["valid_best_f1"] for r in found])
                rows.append(
                    [
                        name,
                        budget,
                        strategy,
                        "{:.3f} ± {:.3f}".format(*interval(served)),
                        "{:.3f} ± {:.3f}".format(*interval(best)),
                        "{:+.3f} ± {:.3f}".format(*interval(served - best)),
                        len(found),
                    ]
                )
    return common.markdown_table(headers, rows)


def _by_seed(runs: list[dict[str, Any]], name: str, strategy: str, budget: int) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in runs if r["dataset"] == name and r["strategy"] == strategy and r["budget"] == budget}


def timing_table(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Minutes per training job (start to done, re-encoding and switch included) and how many were adopted."""
    headers = ["benchmark", "labels", "jobs", "refused (too few labels)", "adopted", "minutes: mean", "max"]
    rows = []
    for name in args.datasets:
        for budget in sorted(args.budgets):
            found = [r for r in runs if r["dataset"] == name and r["budget"] == budget]
            ran = [r for r in found if r["job_seconds"]]
            minutes = np.array([r["job_seconds"] / 60 for r in ran])
            rows.append(
                [
                    name,
                    budget,
                    len(found),
                    sum(1 for r in found if r["job_status"] == "refused"),
                    sum(1 for r in found if r["adopted"]),
                    f"{minutes.mean():.1f}" if len(minutes) else "",
                    f"{minutes.max():.1f}" if len(minutes) else "",
                ]
            )
    return common.markdown_table(headers, rows)


def probe_table(probes: list[dict[str, Any]]) -> str:
    headers = ["benchmark", "seed", "idle p50 / p99 ms", "during jobs p50 / p99 ms", "requests during jobs", "not 200"]
    rows = [
        [
            p["dataset"],
            p["seed"],
            f"{p['idle'].get('p50_ms', 0):.1f} / {p['idle'].get('p99_ms', 0):.1f}",
            f"{p['job'].get('p50_ms', 0):.1f} / {p['job'].get('p99_ms', 0):.1f}",
            p["job"]["n"],
            p["job"]["not_200"] + p["idle"]["not_200"],
        ]
        for p in probes
    ]
    return common.markdown_table(headers, rows)


def figure(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in args.datasets if any(r["dataset"] == n for r in runs)]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        for strategy in ("review", "random"):
            points = []
            for budget in sorted(args.budgets):
                values = np.array([r["test_f1"] for r in _by_seed(runs, name, strategy, budget).values()])
                if len(values):
                    points.append((budget, *interval(values)))
            if points:
                x, mean, half = zip(*points, strict=True)
                label = "labels asked by /review" if strategy == "review" else "random train.csv pairs"
                axis.errorbar(x, mean, yerr=half, marker="o", capsize=3, label=label)
        axis.set_xscale("log")
        axis.set_xticks(sorted(args.budgets), [str(b) for b in sorted(args.budgets)])
        axis.minorticks_off()
        axis.set_xlabel("labels")
        axis.set_ylabel("test F1")
        axis.set_title(name)
        axis.legend()
    fig.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120)


if __name__ == "__main__":
    main()
