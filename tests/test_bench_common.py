"""The benchmarks' own plumbing."""

from __future__ import annotations

from bench import common
from encoding.registry import SMOLLM2_FOLDER
from llmatch.settings import Settings


def test_a_benchmark_server_sees_the_models_fetched_into_the_checkout(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    (checkout / "models" / SMOLLM2_FOLDER).mkdir(parents=True)
    monkeypatch.setenv("LLMATCH_DATA_DIR", str(checkout))
    server_data = tmp_path / "server"
    server_data.mkdir()
    common.link_checkout_models(server_data)
    assert Settings(data_dir=server_data).models_dir.joinpath(SMOLLM2_FOLDER).is_dir()
