"""A sentence-transformers folder run with transformers alone, when its modules are the usual Transformer,
Pooling (one of cls, mean, max) and optionally Normalize: the vectors ``SentenceTransformer`` gives, without
importing sentence-transformers, whose import (scikit-learn, scipy and pandas come with it) costs every worker
start over a second of CPU. Any other folder is left to the library: ``load_plain_model`` returns None."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}
# What sentence_bert_config.json may hold for the folder to stay plain: no model, tokenizer or config arguments.
PLAIN_TRANSFORMER_KEYS = {"max_seq_length", "do_lower_case"}
# Models sentence-transformers loads other than through AutoModel (their encoder half only).
ENCODER_HALF_MODEL_TYPES = {"t5", "mt5", "umt5"}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what Transformer.forward passes on


@dataclass(frozen=True)
class PlainLayout:
    """What a plain folder says: the transformer's folder, its settings and the pooling."""

    transformer_path: Path
    max_seq_length: int | None
    do_lower_case: bool
    pooling: str
    dim: int


class PlainSentenceModel:
    """Transformer, then pooling, as ``SentenceTransformer.forward`` computes them (normalising is left to the
    caller, which always normalises)."""

    def __init__(self, layout: PlainLayout, device: str):
        from transformers import AutoModel, AutoTokenizer

        self.layout = layout
        self.model = AutoModel.from_pretrained(str(layout.transformer_path), local_files_only=True).to(device).eval()
        # clean_up_tokenization_spaces only affects decoding, which an encoder never does; naming it silences
        # transformers 4.44's warning about its coming default.
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(layout.transformer_path), local_files_only=True, clean_up_tokenization_spaces=True
        )
        self.do_lower_case = layout.do_lower_case
        self.max_seq_length = layout.max_seq_length or min(
            self.model.config.max_position_embeddings, self.tokenizer.model_max_length
        )
        self.dim = layout.dim

    @property
    def device(self) -> Any:
        return self.model.device

    def embed(self, features: dict[str, Any]) -> Any:
        """Pooled token embeddings of a padded batch (a float tensor, rows x dim)."""
        import torch

        inputs = {name: features[name] for name in MODEL_INPUTS if name in features}
        tokens = self.model(**inputs, return_dict=False)[0]
        mask = features["attention_mask"].unsqueeze(-1).expand(tokens.size()).to(tokens.dtype)
        if self.layout.pooling == "cls":
            return tokens[:, 0]
        if self.layout.pooling == "max":
            return torch.max(tokens.masked_fill(mask == 0, -1e9), 1)[0]
        return torch.sum(tokens * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)


def plain_layout(folder: str | Path) -> PlainLayout | None:
    """The folder's layout when transformers alone reproduces it, else None."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        types = [module["type"] for module in modules]
        if types not in ([TRANSFORMER, POOLING], [TRANSFORMER, POOLING, NORMALIZE]):
            return None
        transformer_path = folder / modules[0].get("path", "")
        settings = _json(transformer_path / "sentence_bert_config.json")
        pooling = _json(folder / modules[1]["path"] / "config.json")
        prompts = _json(folder / "config_sentence_transformers.json")
        model_type = _json(transformer_path / "config.json").get("model_type")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    modes = [mode for key, mode in POOLING_MODES.items() if pooling.get(key)]
    other_modes = [key for key, value in pooling.items() if key.startswith("pooling_mode_") and value]
    if (
        len(modes) != 1
        or len(other_modes) != 1
        or set(settings) - PLAIN_TRANSFORMER_KEYS
        or prompts.get("default_prompt_name")
        or model_type in ENCODER_HALF_MODEL_TYPES
        or (transformer_path / "adapter_config.json").exists()
    ):
        return None
    return PlainLayout(
        transformer_path=transformer_path,
        max_seq_length=settings.get("max_seq_length"),
        do_lower_case=bool(settings.get("do_lower_case", False)),
        pooling=modes[0],
        dim=int(pooling["word_embedding_dimension"]),
    )


def load_plain_model(folder: str | Path, device: str) -> PlainSentenceModel | None:
    layout = plain_layout(folder)
    return PlainSentenceModel(layout, device) if layout else None


def _json(path: Path) -> dict:
    """A JSON object from ``path``; an absent file is an empty one."""
    if not path.exists():
        return {}
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value
