"""What the cut of rendered text before tokenisation (LLMATCH_MAX_TEXT_CHARS) saves: the time to embed one
record at the contract's maxima (256 attributes of 65,536 characters) with the cut and without it, against a
typical benchmark record, all measured in this run with the same encoder in this process.

    .venv/bin/python -m bench.text_cap [--encoder minilm] [--repeat 3] [--out bench/out/text_cap.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from encoding.encoder import EncoderInput
from encoding.registry import EncoderPool
from encoding.render import RenderConfig, render
from llmatch.settings import Settings
from service.schemas import MAX_ATTRIBUTES, MAX_VALUE_CHARS

TYPICAL = {"title": "sony bravia kdl-40v4100 40in lcd tv", "category": "televisions", "brand": "sony", "price": 999}


def timed(pool: EncoderPool, encoder: str, text: str, repeat: int) -> float:
    """Median seconds to encode ``text`` alone (after one untimed call that loads the model)."""
    pool.encode(encoder, [EncoderInput(None, "warm up")])
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        pool.encode(encoder, [EncoderInput(None, text)])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/out/text_cap.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    settings = Settings(device="cpu")
    pool = EncoderPool(settings)
    largest = {f"attribute_{i:03d}": "word " * (MAX_VALUE_CHARS // 5) for i in range(MAX_ATTRIBUTES)}
    texts = {
        "typical record": render(TYPICAL, RenderConfig()),
        "largest record, cut": render(largest, RenderConfig()),
        "largest record, uncut": render(largest, RenderConfig()),
    }
    rows = []
    for name, text in texts.items():
        pool.max_text_chars = len(text) if name.endswith("uncut") else settings.max_text_chars
        seconds = timed(pool, args.encoder, text, args.repeat)
        rows.append({"case": name, "characters": len(text), "seconds": seconds})
    base = rows[0]["seconds"]
    table = [
        f"| case | characters rendered | characters encoded | seconds (median of {args.repeat}) | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        encoded = row["characters"] if row["case"] != "largest record, cut" else settings.max_text_chars
        row["encoded_characters"] = min(row["characters"], encoded)
        row["ratio"] = row["seconds"] / base
        table.append(
            f"| {row['case']} | {row['characters']:,} | {row['encoded_characters']:,} | {row['seconds']:.4f} "
            f"| {row['ratio']:.1f}x |"
        )
    print("\n".join(table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "encoder": args.encoder,
        "max_text_chars": settings.max_text_chars,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows,
        "table": "\n".join(table),
    }
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
