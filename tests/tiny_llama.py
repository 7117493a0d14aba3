"""Tiny random models for tests: built offline in about a second, loadable by ``LLM2Vec.from_pretrained``."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

UNK_TOKEN = "<unk>"
EOS_TOKEN = "</s>"
HIDDEN_SIZE = 64
SEED = 1234

CORPUS = [
    "[name] sony tv [\\name] [price] 499.99 [\\price]",
    "[name] samsung galaxy s21 128gb black [\\name] [brand] samsung [\\brand]",
    "[name] apple iphone 13 pro 256gb [\\name] [brand] apple [\\brand]",
    "[title] lg oled55c1 55 inch 4k smart tv [\\title] [year] 2021 [\\year]",
    "canon eos r6 mirrorless camera body only",
    "nikon z6 ii digital camera with 24-70mm lens",
    "bose quietcomfort 45 wireless noise cancelling headphones",
    "sony wh-1000xm4 wireless headphones (black)",
    "dell xps 13 laptop intel core i7 16gb ram 512gb ssd",
    "lenovo thinkpad x1 carbon gen 9, 14 inch, 1tb",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "represent the product for retrieving duplicate products: query document record",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A small lower-cased BPE tokenizer (no BOS, no token_type_ids) trained on the built-in corpus."""
    backend = Tokenizer(BPE(unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.BPEDecoder()
    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    trainer = BpeTrainer(vocab_size=400, special_tokens=[UNK_TOKEN, EOS_TOKEN], initial_alphabet=alphabet)
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(folder: Path) -> Path:
    """Save a deterministic random 2-layer Llama (hidden size 64) and its tokenizer into ``folder``."""
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def build_tiny_non_llama(folder: Path) -> Path:
    """Save a tiny random GPT-2 (an architecture llm2vec cannot make bidirectional) into ``folder``."""
    tokenizer = build_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=HIDDEN_SIZE, n_layer=2, n_head=4, n_positions=512)
    torch.manual_seed(SEED)
    GPT2Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
