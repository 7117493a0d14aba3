"""What a training stage is told: the stage names and the options a user chooses (no torch import here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05


STAGES = ("mntp", "simcse", "supervised", "identifiers")  # identifiers: no training, a weight chosen on valid


class StageError(ValueError):
    """A stage that cannot run on this base model or data (a clear message for the user)."""


@dataclass(frozen=True)
class StageOptions:
    """What the user chose for a stage (the defaults are sized for a GPU; the command shrinks them on a CPU)."""

    batch_size: int
    learning_rate: float
    epochs: float = 1.0
    max_steps: int | None = None
    max_length: int | None = None  # tokens; None: the base model's own limit (LLM2Vec: 512)
    seed: int = 42
    lora: LoraSettings = LoraSettings()
    mask_probability: float = 0.2  # MNTP
    simcse_dropout: float = 0.3  # SimCSE: attention dropout of the LLM (sentence-transformers keep their own)
    pair_loss_weight: float = 1.0  # supervised: weight of the CoSENT term over labelled pairs (0: InfoNCE only)
    eval_every: int | None = None  # supervised: steps between valid evaluations (None: once per epoch)
    mined_negatives: int = 0  # supervised: tableB records nearest each match's left record, mined as extra negatives
    identifier_weights: tuple[float, ...] = (0.0,)  # identifiers: candidate identifier weights, chosen on valid F1
    train_identifier_weight: float = 0.0  # supervised: identifier weight of the cosines the losses see (0: dense)
    # supervised and identifiers: what the checkpoint and the identifier weight are chosen on; "f1" (best-threshold
    # F1) or "average_precision" (the whole ranking: steadier than F1 on a few hundred pairs, and rarely tied)
    selection_metric: str = "f1"
    validate: bool = True  # mntp/simcse: measure valid F1 after training (supervised always does)
    checkpoint_every: int = 50
    gradient_checkpointing: bool = False
    # Called with (steps done, steps in all) after each optimisation step (a training job reports its progress).
    on_step: Callable[[int, int], None] | None = field(default=None, compare=False, repr=False)


def require_llm2vec(stage: str, encoder_name: str, kind: str) -> None:
    """MNTP and SimCSE-on-an-LLM need a decoder LLM; refuse other encoder kinds with a clear message."""
    if kind != "llm2vec":
        raise StageError(
            f"{stage} trains a decoder LLM made bidirectional; {encoder_name!r} is a {kind} model "
            "(fine-tune it with the supervised stage)"
        )
