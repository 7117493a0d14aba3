"""Encoder throughput: the worker's encoders against the libraries' own ``encode``, same texts, one run.

Two pairs, each on the same rendered records (half ``dirty_walmart_amazon/tableB.csv``, half
``abt_buy/tableB.csv``, tagged serialization, as the service renders them):

- the worker's LLM2Vec path (``EncoderPool.encode`` on the converted SmolLM2, with an instruction) against
  ``llm2vec.LLM2Vec.encode`` on the same ``[instruction, text]`` pairs and the same loaded model;
- the worker's sentence-transformers path (``EncoderPool.encode("minilm")``) against
  ``SentenceTransformer.encode`` on the same texts and model.

Texts go in chunks of ``--chunk`` (the worker's records per encoder call); for each chunk both sides run
back to back, alternating which goes first, so that a change of load on the machine hits both alike. Both
use the encoder's configured ``batch_size`` (rows per forward pass). Loading and one warm-up call per side
are not timed. Reported per path: seconds, records/s, tokens/s (tokens of the texts as the model sees
them, without padding), the ratio against its baseline, and the largest difference between the two
sides' unit vectors (they embed the same thing: the difference is float rounding).

    .venv/bin/python -m bench.encoder_throughput                  # 2,000 texts: SmolLM2 takes minutes
    .venv/bin/python -m bench.encoder_throughput --texts 200      # a quick look
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python bench/encoder_throughput.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common

DEFAULT_SMOLLM2 = common.REPO_ROOT / ".data" / "models" / "smollm2-135m-instruct"
DEFAULT_TABLES = (
    common.DATASETS_DIR / "dirty_walmart_amazon" / "tableB.csv",
    common.DATASETS_DIR / "abt_buy" / "tableB.csv",
)
INSTRUCTION = "Represent the text for finding another product description for the same product"

Encode = Callable[[Sequence[Any]], np.ndarray]


@dataclass
class Side:
    """One way of encoding, and what it cost."""

    name: str
    encode: Encode
    seconds: float = 0.0
    vectors: list[np.ndarray] | None = None


def bench_texts(count: int, tables: Sequence[Path] = DEFAULT_TABLES) -> list[str]:
    """``count`` rendered records, taken in equal shares from ``tables`` (non-empty texts only)."""
    share, texts = -(-count // len(tables)), []
    for path in tables:
        texts += [text for text in common.rendered_texts(common.read_table(path, share, exact=False)) if text][:share]
    if len(texts) < count:
        raise SystemExit(f"the tables hold {len(texts)} non-empty records, fewer than the {count} asked for")
    return texts[:count]


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def race(baseline: Side, ours: Side, inputs: Sequence[Any], chunk: int) -> None:
    """Encode ``inputs`` chunk by chunk with both sides, alternating which goes first; accumulate times."""
    baseline.encode(inputs[:4])  # warm-up: first calls pay one-time costs
    ours.encode(inputs[:4])
    for side in (baseline, ours):
        side.seconds, side.vectors = 0.0, []
    for number, part in enumerate(chunks(inputs, chunk)):
        for side in (baseline, ours) if number % 2 == 0 else (ours, baseline):
            started = time.perf_counter()
            vectors = side.encode(part)
            side.seconds += time.perf_counter() - started
            side.vectors.append(vectors)


def rows_for(baseline: Side, ours: Side, records: int, tokens: int) -> list[list[Any]]:
    ours_vectors, base_vectors = np.vstack(ours.vectors), np.vstack(baseline.vectors)
    difference = float(np.abs(ours_vectors - base_vectors).max())
    return [
        [baseline.name, records, baseline.seconds, records / baseline.seconds, tokens / baseline.seconds, 1.0, "-"],
        [
            ours.name,
            records,
            ours.seconds,
            records / ours.seconds,
            tokens / ours.seconds,
            baseline.seconds / ours.seconds,
            f"{difference:.1e}",
        ],
    ]


def llm2vec_sides(pool: Any, name: str) -> tuple[Side, Side, Callable[[Sequence[Any]], int]]:
    """(``LLM2Vec.encode``, the worker's path, a token counter) for the pool's LLM2Vec encoder ``name``."""
    from encoding.encoder import l2_normalise
    from encoding.llm2vec import instruction_text_pairs, tokenize

    encoder, batch_size = pool.get(name), pool.spec(name).batch_size
    model = encoder.model

    def library(inputs: Sequence[Any]) -> np.ndarray:
        pairs = instruction_text_pairs(model, inputs)
        vectors = model.encode(pairs, batch_size=batch_size, show_progress_bar=False, device=encoder.device)
        return l2_normalise(vectors.float().numpy())

    def tokens(inputs: Sequence[Any]) -> int:
        return sum(len(ids) for ids in tokenize(model, inputs).input_ids)

    return (
        Side("llm2vec.LLM2Vec.encode", library),
        Side("worker LLM2Vec path (EncoderPool.encode)", lambda inputs: pool.encode(name, inputs)),
        tokens,
    )


def sentence_transformer_sides(pool: Any, name: str) -> tuple[Side, Side, Callable[[Sequence[Any]], int]]:
    """(``SentenceTransformer.encode``, the worker's path, a token counter) for encoder ``name``."""
    from sentence_transformers import SentenceTransformer

    from encoding.encoder import l2_normalise
    from encoding.sentence_transformer import sentence_text

    encoder, spec = pool.get(name), pool.spec(name)
    model = SentenceTransformer(str(spec.model), device=encoder.model.device, local_files_only=True)
    if spec.max_length:
        model.max_seq_length = spec.max_length

    def library(inputs: Sequence[Any]) -> np.ndarray:
        texts = [sentence_text(item) for item in inputs]
        return l2_normalise(model.encode(texts, batch_size=spec.batch_size, show_progress_bar=False))

    def token_count(inputs: Sequence[Any]) -> int:
        texts = [sentence_text(item) for item in inputs]
        return int(model.tokenize(texts)["attention_mask"].sum())

    return (
        Side("SentenceTransformer.encode", library),
        Side("worker sentence-transformers path (EncoderPool.encode)", lambda inputs: pool.encode(name, inputs)),
        token_count,
    )


def measure(pool: Any, name: str, inputs: Sequence[Any], chunk: int) -> list[list[Any]]:
    """The two table rows of encoder ``name``: its library baseline and the worker's path."""
    kind = pool.spec(name).kind
    baseline, ours, count_tokens = (llm2vec_sides if kind == "llm2vec" else sentence_transformer_sides)(pool, name)
    print(f"{name}: {len(inputs)} texts in chunks of {chunk} ...", flush=True)
    race(baseline, ours, inputs, chunk)
    return rows_for(baseline, ours, len(inputs), count_tokens(inputs))


HEADERS = ["path", "records", "seconds", "records/s", "tokens/s", "ratio vs library", "max |diff|"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--texts", type=int, default=2000, help="records (half from each table)")
    parser.add_argument("--llm-texts", type=int, default=None, help="records for SmolLM2; None: --texts")
    parser.add_argument("--chunk", type=int, default=64, help="records per encoder call (the worker's commit size)")
    parser.add_argument("--smollm2", type=Path, default=DEFAULT_SMOLLM2, help="converted SmolLM2 folder")
    parser.add_argument("--instruction", default=INSTRUCTION, help="the LLM2Vec instruction ('' for none)")
    parser.add_argument("--skip", choices=("smollm2", "minilm"), action="append", default=[])
    parser.add_argument("--out", type=Path, default=common.default_out("encoder_throughput"))
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from encoding.encoder import EncoderInput
    from encoding.registry import EncoderPool, EncoderSpec
    from llmatch.settings import Settings

    pool = EncoderPool(Settings(device="cpu"))
    texts = bench_texts(max(args.texts, args.llm_texts or 0))
    rows: list[list[Any]] = []
    if "smollm2" not in args.skip:
        if not (args.smollm2 / "config.json").is_file():
            raise SystemExit(f"no converted SmolLM2 at {args.smollm2} (run `make smollm2` or pass --smollm2)")
        pool.add(EncoderSpec("bench-smollm2", "llm2vec", str(args.smollm2), batch_size=pool.spec("smollm2").batch_size))
        llm_inputs = [EncoderInput(args.instruction or None, text) for text in texts[: args.llm_texts or args.texts]]
        rows += measure(pool, "bench-smollm2", llm_inputs, args.chunk)
    if "minilm" not in args.skip:
        rows += measure(pool, "minilm", [EncoderInput(None, text) for text in texts[: args.texts]], args.chunk)

    table = common.markdown_table(HEADERS, rows)
    report = {
        "benchmark": "encoder_throughput",
        "machine": common.machine(),
        "torch_threads": torch.get_num_threads(),
        "config": {key: str(value) for key, value in vars(args).items()},
        "rows": [dict(zip(HEADERS, row, strict=True)) for row in rows],
    }
    common.publish(args.out, report, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
