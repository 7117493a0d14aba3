"""The models being trained: one embedding interface over sentence-transformers and LLM2Vec, plus the MNTP head.

Each trainee embeds exactly the strings the serving encoder of the same kind embeds, so what is trained is
what is served.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from encoding.encoder import EncoderInput
from encoding.llm2vec import UnsupportedModelError, load_llm2vec, tokenizer_inputs, torch_dtype
from encoding.manifest import relative_path
from encoding.sentence_transformer import sentence_text
from training.options import LoraSettings

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Trainee(Protocol):
    """A model under training."""

    @property
    def module(self) -> torch.nn.Module:
        """The torch module whose trainable parameters are optimised (and checkpointed)."""
        ...

    def save(self, folder: Path) -> None:
        """Write the trained weights (a model folder or a PEFT adapter) into ``folder``."""
        ...

    def encoder_block(self, folder: Path) -> dict[str, Any]:
        """The manifest's encoder specification for weights saved in ``folder`` (paths relative to it)."""
        ...


class EmbeddingTrainee(Trainee, Protocol):
    def embed(self, inputs: Sequence[EncoderInput]) -> torch.Tensor:
        """Un-normalised embeddings of shape ``(len(inputs), dim)``, with gradients in training mode."""
        ...


def _to(features: dict[str, Any], device: str) -> dict[str, Any]:
    return {key: value.to(device) if hasattr(value, "to") else value for key, value in features.items()}


class SentenceTransformerTrainee:
    """A sentence-transformers model, fully fine-tuned."""

    def __init__(self, model_path: str, device: str, max_length: int | None = None):
        from sentence_transformers import SentenceTransformer

        self.device = device
        self.model = SentenceTransformer(model_path, device=device, local_files_only=True)
        if max_length:
            self.model.max_seq_length = max_length

    def embed(self, inputs: Sequence[EncoderInput]) -> torch.Tensor:
        features = self.model.tokenize([sentence_text(item) for item in inputs])
        return self.model(_to(features, self.device))["sentence_embedding"]

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def save(self, folder: Path) -> None:
        self.model.save(str(folder))

    def encoder_block(self, folder: Path) -> dict[str, Any]:
        return {"kind": "sentence-transformers", "model": "."}


def lora_config(lora: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=LORA_TARGETS)


class LLM2VecTrainee:
    """A bidirectional decoder LLM (earlier adapters merged) with a fresh LoRA adapter, mean-pooled."""

    def __init__(
        self,
        model_path: str,
        adapters: Sequence[str],
        device: str,
        max_length: int,
        lora: LoraSettings,
        attention_dropout: float = 0.0,
        gradient_checkpointing: bool = False,
    ):
        from peft import get_peft_model

        self.device = device
        self.model_path = model_path
        self.adapters = list(adapters)
        self.max_length = max_length
        self.l2v = load_llm2vec(model_path, adapters, device, "mean", max_length, attention_dropout=attention_dropout)
        self.l2v.model = get_peft_model(self.l2v.model, lora_config(lora))
        if gradient_checkpointing:
            self.l2v.model.enable_input_require_grads()
            self.l2v.model.gradient_checkpointing_enable()

    def embed(self, inputs: Sequence[EncoderInput]) -> torch.Tensor:
        features = self.l2v.tokenize(tokenizer_inputs(self.l2v, inputs))
        return self.l2v.forward(_to(features, self.device)).float()

    @property
    def module(self) -> torch.nn.Module:
        return self.l2v

    def save(self, folder: Path) -> None:
        self.l2v.model.save_pretrained(str(folder))

    def encoder_block(self, folder: Path) -> dict[str, Any]:
        return llm2vec_encoder_block(self.model_path, self.adapters, folder, self.max_length)


def llm2vec_encoder_block(model_path: str, adapters: Sequence[str], folder: Path, max_length: int) -> dict[str, Any]:
    """The encoder block of a stage that adds the adapter in ``folder`` to a base model and earlier adapters."""
    return {
        "kind": "llm2vec",
        "model": relative_path(model_path, folder),
        "adapter": [relative_path(path, folder) for path in adapters] + ["."],
        "pooling": "mean",
        "max_length": max_length,
    }


def _mntp_class(config_class_name: str):
    from llm2vec.models import GemmaBiForMNTP, LlamaBiForMNTP, MistralBiForMNTP, Qwen2BiForMNTP

    classes = {
        "LlamaConfig": LlamaBiForMNTP,
        "MistralConfig": MistralBiForMNTP,
        "GemmaConfig": GemmaBiForMNTP,
        "Qwen2Config": Qwen2BiForMNTP,
    }
    if config_class_name not in classes:
        raise UnsupportedModelError(
            f"llm2vec can make only Llama, Mistral, Gemma and Qwen2 models bidirectional; this model has a "
            f"{config_class_name}"
        )
    return classes[config_class_name]


class MNTPTrainee:
    """Masked next-token prediction: a bidirectional LLM predicts each masked token from the position before it."""

    def __init__(
        self,
        model_path: str,
        adapters: Sequence[str],
        device: str,
        max_length: int,
        lora: LoraSettings,
        gradient_checkpointing: bool = False,
    ):
        from peft import PeftModel, get_peft_model
        from transformers import AutoConfig, AutoTokenizer

        self.device = device
        self.model_path = model_path
        self.adapters = list(adapters)
        self.max_length = max_length
        config = AutoConfig.from_pretrained(model_path)
        model_class = _mntp_class(type(config).__name__)
        self.model = model_class.from_pretrained(model_path, torch_dtype=torch_dtype(device))
        for adapter in self.adapters:
            self.model.set_model_for_peft(
                PeftModel.from_pretrained(self.model.get_model_for_peft(), adapter).merge_and_unload()
            )
        self.model.set_model_for_peft(get_peft_model(self.model.get_model_for_peft(), lora_config(lora)))
        if gradient_checkpointing:
            self.model.enable_input_require_grads()
            self.model.gradient_checkpointing_enable()
        self.model.to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # as LLM2Vec pads
        self.mask_token_id = mask_token_id(self.tokenizer)

    def loss(self, texts: Sequence[str], mask_probability: float, generator: torch.Generator) -> torch.Tensor:
        """Mask a share of the tokens; the logits at position i-1 predict the original token at position i."""
        batch = self.tokenizer(
            list(texts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=False,
        )
        input_ids, attention = batch["input_ids"], batch["attention_mask"]
        chosen = (torch.rand(input_ids.shape, generator=generator) < mask_probability) & attention.bool()
        chosen[:, 0] = False  # the first position has no position before it to predict it from
        if not chosen.any() and input_ids.shape[1] > 1:  # short texts drew no mask: mask their last tokens
            chosen[:, -1] = True  # left padding: the last position always holds a token
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
        masked = torch.where(chosen, torch.full_like(input_ids, self.mask_token_id), input_ids)
        # The causal-LM loss shifts labels by one: exactly the MNTP objective on a bidirectional model.
        output = self.model(
            input_ids=masked.to(self.device), attention_mask=attention.to(self.device), labels=labels.to(self.device)
        )
        return output.loss

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def save(self, folder: Path) -> None:
        self.model.get_model_for_peft().save_pretrained(str(folder))

    def encoder_block(self, folder: Path) -> dict[str, Any]:
        return llm2vec_encoder_block(self.model_path, self.adapters, folder, self.max_length)


def mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token, or ``_`` as LLM2Vec uses for decoder tokenizers without one."""
    if tokenizer.mask_token_id is not None:
        return int(tokenizer.mask_token_id)
    underscore = tokenizer.convert_tokens_to_ids("_")
    if underscore is not None and underscore != tokenizer.unk_token_id:
        return int(underscore)
    return int(tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id)
