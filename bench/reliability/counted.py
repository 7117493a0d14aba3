"""``python -m bench.reliability.counted ARGS...`` runs ``llmatch ARGS...`` unchanged, except that every input
sent through an encoder is appended, as a hash of its instruction and text, to
``$LLMATCH_BENCH_ENCODE_LOG/<pid>.log`` once the encoder has returned its vector (one line per input, written
and flushed before the vectors are used), ``<pid>`` being the process that encoded (a worker's encoding
process, not the parent that forked it). A SIGKILLed process keeps what it wrote: the harness counts records
encoded twice, and encoder calls at restarts, from these files."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO


def input_hash(instruction: str | None, text: str) -> str:
    return hashlib.sha256(f"{instruction or ''}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()[:24]


def install(log_dir: Path) -> None:
    """Wrap ``EncoderPool.encode`` so that every encoded input is logged."""
    from encoding.registry import EncoderPool

    log_dir.mkdir(parents=True, exist_ok=True)
    handles: dict[int, TextIO] = {}
    lock = threading.Lock()
    encode = EncoderPool.encode

    def counted(self, name: str, inputs: Sequence, *args, **kwargs):
        vectors = encode(self, name, inputs, *args, **kwargs)
        lines = "".join(f"{input_hash(item.instruction, item.text)}\n" for item in inputs)
        with lock:
            pid = os.getpid()
            if pid not in handles:
                handles[pid] = (log_dir / f"{pid}.log").open("a", buffering=1, encoding="utf-8")
            handles[pid].write(lines)
            handles[pid].flush()
        return vectors

    EncoderPool.encode = counted


def main() -> int:
    directory = os.environ.get("LLMATCH_BENCH_ENCODE_LOG")
    if directory:
        install(Path(directory))
    from llmatch.cli import main as llmatch

    return llmatch(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
