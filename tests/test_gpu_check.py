"""The GPU check in its dry-run form: the same code on the CPU with a tiny model and tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

from bench import gpu_check


def test_dry_run_reports_every_part(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu_check.json"
    sizes = [
        "--texts",
        "12",
        "--chunk",
        "6",
        "--batch-size",
        "4",
        "--vectors",
        "2000",
        "--queries",
        "5",
        "--inline",
        "3",
    ]
    assert gpu_check.main(["--dry-run", *sizes, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["device"] == "cpu"
    encoding = report["encoding"]
    assert encoding["tokens"] > 12 and encoding["parameters"] > 0
    assert encoding["max_abs_difference"] < 1e-5  # both paths embed the same thing
    names = [row[0] for row in report["encoding_rows"]]
    assert names == ["llm2vec.LLM2Vec.encode", "worker LLM2Vec path (EncoderPool.encode)"]
    assert all(row[1] == 12 and row[3] > 0 and row[4] > 0 for row in report["encoding_rows"])
    assert report["faiss"]["where"].startswith("CPU")
    assert report["faiss"]["rows"][0][1] == 2000 and report["faiss"]["rows"][0][4] > 0
    assert [row[0] for row in report["inline_rows"]] == ["in process (no HTTP)", "worker endpoint via RemoteEncodes"]
    assert all(row[1] == 3 and row[2] > 0 for row in report["inline_rows"])
    printed = capsys.readouterr().out
    assert "of bf16 peak" in printed and "Inline encode" in printed


def test_peak_is_looked_up_by_device_name() -> None:
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert gpu_check.peak_flops("NVIDIA L4") == 121e12
    assert gpu_check.peak_flops("NVIDIA L40S") == 362e12
    assert gpu_check.peak_flops("Tesla T4") is None
