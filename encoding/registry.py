"""Named encoders: what each name means (specs from settings) and the loaded instances (a pool)."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from encoding.encoder import Encoder, EncoderInput
from encoding.identifiers import DEFAULT_DIMS, IdentifierEncoder
from encoding.manifest import encoder_options
from encoding.recipe import render_options
from encoding.versions import same_dataset, serving_folder
from llmatch.settings import Settings

log = logging.getLogger(__name__)

EncoderKind = Literal["sentence-transformers", "llm2vec"]
SMOLLM2_FOLDER = "smollm2-135m-instruct"
MPNET_FOLDER = "all-mpnet-base-v2"


class UnknownEncoderError(LookupError):
    pass


class EncoderUnavailableError(RuntimeError):
    """A configured encoder whose model cannot be loaded (missing folder, unsupported architecture)."""


@dataclass(frozen=True)
class EncoderSpec:
    """What a dataset's ``encoder`` name stands for."""

    name: str
    kind: EncoderKind
    model: str
    adapter: str | tuple[str, ...] | None = None  # a PEFT adapter folder, or several merged in order
    pooling: str = "mean"
    max_length: int | None = None  # tokens; None: the model's own limit (LLM2Vec: 512)
    batch_size: int = 32  # rows per forward pass, at most
    batch_tokens: int | None = None  # padded tokens per forward pass, at most; None: by device (batching.py)
    identifier_weight: float = 0.0  # share of the cosine given to exact identifier tokens (identifiers.py); 0: off
    identifier_dims: int = DEFAULT_DIMS  # hash buckets of the identifier features
    # (serialization, instruction) a folder written by `llmatch train` was trained with; None for other encoders
    trained_render: tuple[str, str | None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.adapter, list):  # JSON configuration gives lists
            object.__setattr__(self, "adapter", tuple(self.adapter))
        if isinstance(self.trained_render, list):
            object.__setattr__(self, "trained_render", tuple(self.trained_render))
        if not 0.0 <= self.identifier_weight < 1.0:
            raise ValueError(f"encoder {self.name!r}: identifier_weight must be at least 0 and below 1")
        if self.identifier_dims < 16:
            raise ValueError(f"encoder {self.name!r}: identifier_dims must be at least 16")

    @property
    def adapters(self) -> tuple[str, ...]:
        if not self.adapter:
            return ()
        return (self.adapter,) if isinstance(self.adapter, str) else tuple(self.adapter)

    @property
    def key(self) -> str:
        """Stable identity of the weights and settings that shape a vector; names the content cache."""
        unused = {"name", "batch_size", "batch_tokens", "trained_render"}
        if not self.identifier_weight:  # keys of encoders without identifier features stay as they were
            unused |= {"identifier_weight", "identifier_dims"}
        identity = {k: v for k, v in asdict(self).items() if k not in unused}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]

    @property
    def available(self) -> bool:
        """False when the model is a local path that does not exist (hub ids are assumed available)."""
        return all(_available(path) for path in (self.model, *self.adapters))


def _available(path: str) -> bool:
    looks_local = path.startswith(("/", ".", "~")) or Path(path).exists()
    return not looks_local or Path(path).expanduser().exists()


def builtin_specs(settings: Settings) -> dict[str, EncoderSpec]:
    from encoding.sentence_transformer import packaged_minilm_path

    return {
        "minilm": EncoderSpec("minilm", "sentence-transformers", str(packaged_minilm_path()), batch_size=64),
        "smollm2": EncoderSpec(
            "smollm2", "llm2vec", str((settings.models_dir / SMOLLM2_FOLDER).resolve()), batch_size=16
        ),
        "mpnet": EncoderSpec(
            "mpnet", "sentence-transformers", str((settings.models_dir / MPNET_FOLDER).resolve()), batch_size=32
        ),
    }


def configured_specs(settings: Settings) -> dict[str, EncoderSpec]:
    """Built-in encoders plus those named in ``LLMATCH_ENCODERS`` and ``LLMATCH_ENCODERS_FILE``.

    A name maps to a specification (``{"kind": ..., "model": ...}``) or to a folder written by ``llmatch train``.
    """
    specs = builtin_specs(settings)
    extra: dict[str, dict[str, Any] | str] = {}
    if settings.encoders_file:
        extra.update(json.loads(Path(settings.encoders_file).read_text()))
    extra.update(settings.encoders)
    for name, options in extra.items():
        specs[name] = spec_from_options(name, options)
    return specs


def spec_from_options(name: str, options: dict[str, Any] | str | Path) -> EncoderSpec:
    """A spec from configuration: a dict of EncoderSpec fields, or the path of a trained encoder folder."""
    if isinstance(options, (str, Path)):
        serialization, instruction = render_options(options, None, None)
        return EncoderSpec(name=name, **encoder_options(options), trained_render=(serialization, instruction))
    return EncoderSpec(name=name, **options)


def resolve_device(setting: str) -> str:
    if setting != "auto":
        return setting
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_encoder(spec: EncoderSpec, device: str) -> Encoder:
    """Load the model a spec names (this is the slow part: seconds to minutes)."""
    if not spec.available:
        missing = [path for path in (spec.model, *spec.adapters) if not _available(path)]
        raise EncoderUnavailableError(f"encoder {spec.name!r}: model folder {missing[0]} does not exist")
    log.info("loading encoder %s (%s, %s) on %s", spec.name, spec.kind, spec.model, device)
    started = time.monotonic()
    dense = _load_dense(spec, device)
    log.info("encoder %s loaded in %.1f s", spec.name, time.monotonic() - started)
    if not spec.identifier_weight:
        return dense
    return IdentifierEncoder(dense, spec.key, spec.identifier_weight, spec.identifier_dims)


def _load_dense(spec: EncoderSpec, device: str) -> Encoder:
    if spec.kind == "sentence-transformers":
        from encoding.sentence_transformer import SentenceTransformerEncoder

        return SentenceTransformerEncoder(
            spec.key, spec.model, device=device, max_seq_length=spec.max_length, batch_tokens=spec.batch_tokens
        )
    if spec.kind == "llm2vec":
        from encoding.llm2vec import LLM2VecEncoder

        return LLM2VecEncoder(
            spec.key,
            spec.model,
            spec.adapters,
            device=device,
            pooling_mode=spec.pooling,
            max_length=spec.max_length or 512,
            batch_tokens=spec.batch_tokens,
        )
    raise UnknownEncoderError(f"encoder {spec.name!r} has unknown kind {spec.kind!r}")


class EncoderPool:
    """Loads each named encoder once per process and serialises calls to it."""

    def __init__(self, settings: Settings):
        self.specs = configured_specs(settings)
        self.models_dir = settings.models_dir
        self.device = resolve_device(settings.device)
        self.max_text_chars = settings.max_text_chars
        self._loaded: dict[str, Encoder] = {}
        self._locks: dict[str, threading.Lock] = {name: threading.Lock() for name in self.specs}
        self._load_lock = threading.Lock()

    def spec(self, name: str) -> EncoderSpec:
        """The configured encoder ``name``, or the encoder version a training job wrote under that name."""
        spec = self.specs.get(name) or self._version_spec(name)
        if spec is None:
            raise UnknownEncoderError(f"unknown encoder {name!r}; configured encoders: {', '.join(sorted(self.specs))}")
        return spec

    def _version_spec(self, name: str) -> EncoderSpec | None:
        """A trained version's spec, read from its folder the first time its name is asked for."""
        folder = serving_folder(self.models_dir, name)
        if folder is None:
            return None
        with self._load_lock:
            if name not in self.specs:
                for older in [other for other in self.specs if same_dataset(other, name)]:
                    self._loaded.pop(older, None)  # a dataset serves one version: the one it replaced goes
                    del self.specs[older]
                self.specs[name] = spec_from_options(name, folder)
                self._locks.setdefault(name, threading.Lock())
            return self.specs[name]

    def get(self, name: str) -> Encoder:
        spec = self.spec(name)
        with self._load_lock:
            if name not in self._loaded:
                self._loaded[name] = load_encoder(spec, self.device)
            return self._loaded[name]

    def encode(self, name: str, inputs: Sequence[EncoderInput]) -> np.ndarray:
        """Encode with the named encoder; texts longer than ``max_text_chars`` are cut before tokenisation."""
        encoder = self.get(name)
        limit = self.max_text_chars
        inputs = [EncoderInput(i.instruction, i.text[:limit]) if len(i.text) > limit else i for i in inputs]
        with self._locks[name]:
            return encoder.encode(inputs, batch_size=self.spec(name).batch_size)

    def add(self, spec: EncoderSpec, encoder: Encoder | None = None) -> None:
        """Register a spec (and optionally an already-loaded instance), e.g. from tests or evaluation."""
        self.specs[spec.name] = spec
        self._locks.setdefault(spec.name, threading.Lock())
        if encoder is not None:
            self._loaded[spec.name] = encoder
