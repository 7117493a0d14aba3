"""GPU check: the worker's LLM2Vec path in bf16, LLM2Vec.encode beside it, GPU FAISS at a million vectors, and
the latency of an inline encode served by the worker. Installs nothing; run it from the repository root:

    .venv/bin/python -m bench.gpu_check                      # the converted SmolLM2 in .data/models/
    .venv/bin/python -m bench.gpu_check --model /models/any-llama-mistral-gemma-qwen2-folder
    .venv/bin/python -m bench.gpu_check --dry-run            # the same code on the CPU, tiny model and sizes

Measured, each on the same texts (records rendered from ../shared/datasets when present, else synthetic
product titles; repeated to --texts):

1. Encoding: the worker's path (``EncoderPool.encode``, bf16 on CUDA) and ``llm2vec.LLM2Vec.encode`` on the
   same loaded model, chunk by chunk (``--chunk`` records per call, as the worker's commit size), alternating
   which side goes first. Records/s, tokens/s (unpadded) and the share of the GPU's dense bf16 peak reached,
   FLOPs estimated as 2 x parameters x tokens; the peak is looked up by device name (H100/H200 989 TFLOPS,
   A100 312, L40S 362, L40 181, L4 121; else "unknown").
2. FAISS: exact inner-product search (``IndexFlatIP``) over ``--vectors`` random unit vectors of the model's
   dimension on the GPU (faiss-gpu), one query at a time (p50/p99) and 1,000 queries per call; without
   faiss GPU support, the report says so and measures on the CPU.
3. Inline encode: one record through the API's client (``service.inline_encoder.RemoteEncodes``) to the
   worker's endpoint (``encoder_worker.inline_server``) in this process, p50/p99, next to the same encode
   without HTTP.

Prints a Markdown table per part and writes everything to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python bench/gpu_check.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench.encoder_throughput import DEFAULT_SMOLLM2, INSTRUCTION, bench_texts, llm2vec_sides, race

# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(); the first match wins (L40S before L4).
BF16_PEAK = [("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12)]
ENCODER = "gpu-check"
FULL = {"texts": 8192, "chunk": 512, "batch_size": 256, "vectors": 1_000_000, "queries": 200, "inline": 100}
DRY = {"texts": 48, "chunk": 16, "batch_size": 8, "vectors": 10_000, "queries": 20, "inline": 5}


def peak_flops(device_name: str) -> float | None:
    for needle, peak in BF16_PEAK:
        if needle in device_name.upper():
            return peak
    return None


def texts_for(count: int, seed: int = 0) -> tuple[list[str], str]:
    """``count`` texts (repeated if needed), and where they came from."""
    try:
        texts, origin = bench_texts(min(count, 2000)), "rendered records of walmart and abt_buy tableB"
    except (OSError, SystemExit):
        rng = random.Random(seed)
        words = "sony canon dell lenovo 4k tv camera laptop black 55in 16gb ssd wireless usb-c pro series".split()
        texts = [f"[name] {' '.join(rng.choices(words, k=rng.randint(3, 30)))} [\\name]" for _ in range(1000)]
        origin = "synthetic product titles (no ../shared/datasets here)"
    return list(itertools.islice(itertools.cycle(texts), count)), origin


def measure_encoding(pool: Any, texts: list[str], chunk: int, device_name: str | None) -> tuple[list[list[Any]], dict]:
    from encoding.encoder import EncoderInput

    inputs = [EncoderInput(INSTRUCTION, text) for text in texts]
    baseline, ours, count_tokens = llm2vec_sides(pool, ENCODER)
    race(baseline, ours, inputs, chunk)
    tokens = count_tokens(inputs)
    params = sum(p.numel() for p in pool.get(ENCODER).model.model.parameters())
    peak = peak_flops(device_name) if device_name else None
    rows, details = [], {"tokens": tokens, "parameters": params, "peak_flops": peak}
    for side in (baseline, ours):
        flops = 2 * params * tokens / side.seconds
        rows.append(
            [
                side.name,
                len(texts),
                side.seconds,
                len(texts) / side.seconds,
                tokens / side.seconds,
                flops / 1e12,
                f"{flops / peak:.1%}" if peak else "unknown",
                baseline.seconds / side.seconds,
            ]
        )
    difference = float(np.abs(np.vstack(ours.vectors) - np.vstack(baseline.vectors)).max())
    details["max_abs_difference"] = difference
    return rows, details


def measure_faiss(dim: int, count: int, queries: int, seed: int = 0) -> tuple[list[list[Any]], str]:
    import faiss

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index: Any = faiss.IndexFlatIP(dim)
    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
        where = "GPU (faiss-gpu)"
    else:
        where = "CPU: this faiss has no GPU support" if not hasattr(faiss, "StandardGpuResources") else "CPU: no GPU"
    started = time.perf_counter()
    index.add(vectors)
    add_seconds = time.perf_counter() - started
    probe = vectors[rng.integers(0, count, size=queries)]
    index.search(probe[:1], 10)  # warm-up
    single = []
    for row in probe:
        started = time.perf_counter()
        index.search(row[None, :], 10)
        single.append(time.perf_counter() - started)
    batch = vectors[rng.integers(0, count, size=1000)]
    started = time.perf_counter()
    index.search(batch, 10)
    batch_seconds = time.perf_counter() - started
    stats = common.summarize(single)
    rows = [[where, count, dim, add_seconds, stats["p50_ms"], stats["p99_ms"], 1000 / batch_seconds]]
    return rows, where


def measure_inline(pool: Any, repeats: int) -> list[list[Any]]:
    from encoder_worker.inline_server import InlineEncodeServer
    from encoding.encoder import EncoderInput
    from service.inline_encoder import RemoteEncodes

    records = [
        EncoderInput(INSTRUCTION, f"[name] sony bravia kd-{40 + i}x85j {i} inch 4k tv [\\name]") for i in range(repeats)
    ]
    server = InlineEncodeServer(pool, "127.0.0.1", 0, concurrency=4)
    server.start()
    remote = RemoteEncodes(pool, f"http://127.0.0.1:{server.port}", timeout=60)
    try:
        remote.encode(ENCODER, records[:1])  # warm-up (connection, first call)
        rows = []
        for name, encode in (
            ("in process (no HTTP)", pool.encode),
            ("worker endpoint via RemoteEncodes", remote.encode),
        ):
            seconds = []
            for record in records:
                started = time.perf_counter()
                encode(ENCODER, [record])
                seconds.append(time.perf_counter() - started)
            stats = common.summarize(seconds)
            rows.append([name, repeats, stats["p50_ms"], stats["p99_ms"]])
        return rows
    finally:
        remote.close()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_SMOLLM2, help="a local LLM2Vec-capable model folder")
    parser.add_argument("--dry-run", action="store_true", help="CPU, the tests' tiny Llama, tiny sizes")
    for name, value in FULL.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {value} (dry run: {DRY[name]})"
        )
    parser.add_argument("--out", type=Path, default=common.default_out("gpu_check"))
    args = parser.parse_args(argv)
    sizes = {name: getattr(args, name) or (DRY if args.dry_run else FULL)[name] for name in FULL}

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one chip: LLM2Vec.encode spawns a process per visible GPU
    import torch

    from encoding.registry import EncoderPool, EncoderSpec
    from llmatch.settings import Settings

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device visible to torch; run with --dry-run to check the script on the CPU")
    device_name = torch.cuda.get_device_name(0) if cuda else None
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if args.dry_run:
            sys.path.insert(0, str(common.REPO_ROOT / "tests"))
            from tiny_llama import build_tiny_llama

            model = build_tiny_llama(Path(scratch) / "tiny-llama")
        elif not (model / "config.json").is_file():
            raise SystemExit(f"no model folder at {model} (run `make smollm2` or pass --model)")
        pool = EncoderPool(Settings(device="cuda" if cuda else "cpu", data_dir=Path(scratch)))
        pool.add(EncoderSpec(ENCODER, "llm2vec", str(model), batch_size=sizes["batch_size"]))
        texts, origin = texts_for(sizes["texts"])
        print(f"device: {device_name or 'CPU (dry run)'}; model {model}; {len(texts)} texts ({origin})", flush=True)
        started = time.perf_counter()
        encoding, details = measure_encoding(pool, texts, sizes["chunk"], device_name)
        print(f"encoding measured in {time.perf_counter() - started:.0f} s", flush=True)
        dim = pool.get(ENCODER).dim
        faiss_rows, faiss_where = measure_faiss(dim, sizes["vectors"], sizes["queries"])
        inline_rows = measure_inline(pool, sizes["inline"])

    dtype = "bf16" if cuda else "fp32"
    tables = [
        f"Encoding ({dtype}, {len(texts)} texts, {details['tokens']:,} tokens, {details['parameters']:,} parameters, "
        f"chunks of {sizes['chunk']}, batch_size {sizes['batch_size']}; max |diff| of the unit vectors "
        f"{details['max_abs_difference']:.1e})",
        common.markdown_table(
            ["path", "records", "seconds", "records/s", "tokens/s", "TFLOP/s", "of bf16 peak", "ratio vs library"],
            encoding,
        ),
        f"FAISS exact search, k=10 ({faiss_where})",
        common.markdown_table(
            ["where", "vectors", "dim", "add s", "1 query p50 ms", "1 query p99 ms", "queries/s (1,000 per call)"],
            faiss_rows,
        ),
        "Inline encode of one record",
        common.markdown_table(["path", "requests", "p50 ms", "p99 ms"], inline_rows),
    ]
    report = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "device": device_name or "cpu",
        "machine": common.machine(),
        "model": str(args.model) if not args.dry_run else "tiny random Llama (tests/tiny_llama.py)",
        "texts": origin,
        "sizes": sizes,
        "encoding": details,
        "encoding_rows": encoding,
        "faiss": {"where": faiss_where, "rows": faiss_rows},
        "inline_rows": inline_rows,
    }
    common.publish(args.out, report, "\n\n".join(tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
