"""The three training stages. Each reads a base encoder, trains, and writes a stage folder with a manifest."""

from __future__ import annotations

import itertools
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from tqdm import tqdm

from encoding.encoder import EncoderInput
from encoding.identifiers import combine, identifier_vectors
from encoding.manifest import relative_path, write_manifest
from encoding.registry import EncoderSpec, load_encoder, spec_from_options
from matching.calibration import best_f1_threshold
from training import loop
from training.data import TextPair, TrainingData
from training.losses import cosent, info_nce
from training.options import StageError, StageOptions, require_llm2vec
from training.trainees import EmbeddingTrainee, LLM2VecTrainee, MNTPTrainee, SentenceTransformerTrainee

SUPERVISED_ONLY = (
    "eval_every",
    "pair_loss_weight",
    "mined_negatives",
    "train_identifier_weight",
    "selection_metric",
)
# What a checkpoint or an identifier weight can be chosen on: each maps (scores, labels) of valid pairs to a number.
SELECTION_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "f1": lambda scores, labels: best_f1_threshold(scores, labels).f1,
    "average_precision": lambda scores, labels: float(average_precision_score(labels, scores)),
}
CHUNK = 256  # records embedded between progress-bar updates (validation, mining)
log = logging.getLogger("llmatch.train")
Embedder = Callable[[list[EncoderInput]], np.ndarray]  # inputs -> unit-length rows


@dataclass(frozen=True)
class BaseEncoder:
    """Where a stage starts: an encoder spec, and the stages that produced it (from an earlier manifest)."""

    spec: EncoderSpec
    history: tuple[dict[str, Any], ...] = ()
    base_model: str = ""


def run_stage(
    stage: str,
    base: BaseEncoder,
    data: TrainingData,
    options: StageOptions,
    folder: Path,
    device: str,
    resume: bool = False,
) -> BaseEncoder:
    """Train one stage from ``base`` into ``folder``; return the trained encoder as the next stage's base."""
    if stage == "identifiers":
        return _identifiers(base, data, options, folder, device)
    runners = {"mntp": _mntp, "simcse": _simcse, "supervised": _supervised}
    loop.seed_everything(options.seed)  # fresh adapter weights are drawn when the trainee is built
    trainee, result, steps = runners[stage](base, data, options, folder, device, resume)
    block = trainee.encoder_block(folder)
    if options.train_identifier_weight:  # serve the cosine the checkpoint was chosen on
        block["identifier_weight"] = options.train_identifier_weight
    del trainee  # free the training copy before the serving encoder is loaded for validation
    record = {
        "stage": stage,
        "data": data.describe(),
        "steps": steps,
        "seed": options.seed,
        "options": _options_record(stage, options, block["kind"]),
        "device": device,
        "seconds": result.seconds,
        "loss": _loss_summary(result.losses),
        "best_step": result.best_step,
        "evaluations": result.evaluations,
    }
    base_model = base.base_model or base.spec.model
    manifest = {
        "encoder": block,
        "base_model": base_model,
        "render": {"serialization": data.serialization, "instruction": data.instruction},
        "stages": [*base.history, record],
    }
    write_manifest(folder, manifest)
    spec = spec_from_options(folder.name, folder)
    valid_f1 = result.valid_score if options.selection_metric == "f1" else None
    if valid_f1 is None and options.validate:
        valid_f1 = validate_encoder(spec, data, device)
    record["valid_f1"] = manifest["valid_f1"] = round(valid_f1, 4) if valid_f1 is not None else None
    if options.selection_metric != "f1" and result.valid_score is not None:
        record[f"valid_{options.selection_metric}"] = round(result.valid_score, 4)
    write_manifest(folder, manifest)
    log.info("%s: wrote %s (valid F1 %s)", stage, folder, "not measured" if valid_f1 is None else f"{valid_f1:.4f}")
    return BaseEncoder(spec, tuple(manifest["stages"]), base_model)


def _identifiers(base: BaseEncoder, data: TrainingData, options: StageOptions, folder: Path, device: str):
    """No training: choose the identifier weight of ``base`` on valid and write a folder that serves it so."""
    started = time.perf_counter()
    metric = options.selection_metric
    selection = select_identifier_weight(base.spec, data, device, options.identifier_weights, metric)
    best = best_identifier_weight(selection, metric)
    log.info("identifiers: weight %s chosen on valid %s (F1 %.4f)", best["weight"], metric, best["valid_f1"])
    record = {
        "stage": "identifiers",
        "data": data.describe(),
        "steps": 0,
        "seed": options.seed,
        "options": {"identifier_weights": list(options.identifier_weights), "selection_metric": metric},
        "device": device,
        "seconds": round(time.perf_counter() - started, 1),
        "identifier_weights": selection,
        "valid_f1": best["valid_f1"],
        f"valid_{metric}": best[f"valid_{metric}"],  # what it was chosen on
    }
    base_model = base.base_model or base.spec.model
    manifest = {
        "encoder": {**_encoder_block(base.spec, folder), "identifier_weight": best["weight"]},
        "base_model": base_model,
        "render": {"serialization": data.serialization, "instruction": data.instruction},
        "stages": [*base.history, record],
        "valid_f1": best["valid_f1"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, manifest)
    return BaseEncoder(spec_from_options(folder.name, folder), tuple(manifest["stages"]), base_model)


def best_identifier_weight(selection: list[dict[str, float]], metric: str) -> dict[str, float]:
    """The row of ``select_identifier_weight``'s answer with the best valid ``metric``; among equals the first, the
    smallest weight."""
    return max(selection, key=lambda row: row[f"valid_{metric}"])


def _encoder_block(spec: EncoderSpec, folder: Path) -> dict[str, Any]:
    """A manifest encoder block that loads ``spec``'s model (and adapters) from a manifest in ``folder``."""
    block: dict[str, Any] = {"kind": spec.kind, "model": relative_path(spec.model, folder), "pooling": spec.pooling}
    if spec.adapters:
        block["adapter"] = [relative_path(path, folder) for path in spec.adapters]
    if spec.max_length:
        block["max_length"] = spec.max_length
    return block | {"batch_size": spec.batch_size}


def _options_record(stage: str, options: StageOptions, kind: str) -> dict[str, Any]:
    """The options that shaped this stage (those of other stages or model kinds left out)."""
    record = asdict(replace(options, on_step=None))
    record.pop("on_step")
    unused = {
        "mntp": ("simcse_dropout", *SUPERVISED_ONLY),
        "simcse": ("mask_probability", *SUPERVISED_ONLY),
    }.get(stage, ("mask_probability", "simcse_dropout", "validate"))
    for key in (*unused, "identifier_weights", *(("lora", "gradient_checkpointing") if kind != "llm2vec" else ())):
        record.pop(key)
    return record


def _loss_summary(losses: Sequence[float]) -> dict[str, float | None]:
    """Mean loss over the first and the last quarter of the steps (at most 10 steps each)."""
    window = max(1, min(10, len(losses) // 4))
    return {"first": _mean(losses[:window]), "last": _mean(losses[-window:])}


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _steps(count: int, options: StageOptions) -> int:
    steps = max(1, math.ceil(options.epochs * count / options.batch_size))
    return min(steps, options.max_steps) if options.max_steps else steps


def _batch(items: Sequence[Any], step: int, batch_size: int, seed: int) -> list[Any]:
    """The batch for a step: epochs walk a fresh seeded permutation, so a resumed run sees the same batches."""
    per_epoch = max(1, len(items) // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = list(range(len(items)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [items[i] for i in order[offset * batch_size : (offset + 1) * batch_size]]


def _mntp(base: BaseEncoder, data: TrainingData, options: StageOptions, folder: Path, device: str, resume: bool):
    require_llm2vec("mntp", base.spec.name, base.spec.kind)
    texts = [item.text for item in data.record_inputs()]
    trainee = MNTPTrainee(
        base.spec.model,
        base.spec.adapters,
        device,
        options.max_length or 512,
        options.lora,
        options.gradient_checkpointing,
    )
    steps = _steps(len(texts), options)

    def step_loss(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
        return trainee.loss(_batch(texts, step, options.batch_size, options.seed), options.mask_probability, generator)

    result = loop.run("mntp", trainee, step_loss, folder, _loop_settings(options, steps), resume=resume)
    return trainee, result, steps


def embedding_trainee(base: BaseEncoder, options: StageOptions, device: str, dropout: float = 0.0) -> EmbeddingTrainee:
    spec = base.spec
    if spec.kind == "sentence-transformers":
        return SentenceTransformerTrainee(spec.model, device, options.max_length or spec.max_length)
    return LLM2VecTrainee(
        spec.model,
        spec.adapters,
        device,
        options.max_length or spec.max_length or 512,
        options.lora,
        dropout,
        options.gradient_checkpointing,
    )


def _simcse(base: BaseEncoder, data: TrainingData, options: StageOptions, folder: Path, device: str, resume: bool):
    """Two dropout views of each record are positives; the other records in the batch are negatives."""
    inputs = data.record_inputs()
    trainee = embedding_trainee(base, options, device, dropout=options.simcse_dropout)
    steps = _steps(len(inputs), options)

    def step_loss(step: int) -> torch.Tensor:
        batch = _batch(inputs, step, options.batch_size, options.seed)
        return info_nce(trainee.embed(batch), trainee.embed(batch))

    result = loop.run("simcse", trainee, step_loss, folder, _loop_settings(options, steps), resume=resume)
    return trainee, result, steps


@dataclass(frozen=True)
class Anchor:
    """A matching pair from train.csv, the labelled non-matches of its left record, and any mined ones."""

    left: str
    right: str
    hard_negatives: tuple[str, ...]
    mined_negatives: tuple[str, ...] = ()


def anchors(pairs: Sequence[TextPair]) -> list[Anchor]:
    negatives: dict[str, list[str]] = defaultdict(list)
    for pair in pairs:
        if pair.label == 0:
            negatives[pair.left].append(pair.right)
    return [Anchor(p.left, p.right, tuple(negatives[p.left])) for p in pairs if p.label == 1]


def _supervised(base: BaseEncoder, data: TrainingData, options: StageOptions, folder: Path, device: str, resume: bool):
    """Contrastive fine-tuning on labelled pairs; the checkpoint with the best valid F1 is kept.

    Each step: InfoNCE (both directions) of a batch of matches against the batch's other records, one
    labelled non-match of each left record and, with ``mined_negatives``, one of the tableB records the base
    model put nearest it (train.csv's matches left out); plus, weighted by ``pair_loss_weight``, CoSENT over
    the labelled pair scores of the step (its matches, those non-matches, and a batch drawn from all of
    train.csv's non-matches, most of whose left records have no match to anchor InfoNCE). With
    ``train_identifier_weight``, every cosine is the one the served encoder computes with that identifier
    weight, so the dense part learns what the identifiers do not already say.
    """
    train = data.pairs("train")
    batch_anchors = anchors(train)
    if not batch_anchors:
        raise StageError("supervised training needs train.csv with at least one match (label 1) in the datasets")
    if not data.pairs("valid"):
        raise StageError("supervised training selects its checkpoint on valid.csv, which has no pairs")
    matches = {(p.left, p.right) for p in train if p.label == 1}
    non_matches = [p for p in train if p.label == 0] if options.pair_loss_weight else []
    trainee = embedding_trainee(base, options, device)
    if options.mined_negatives:
        batch_anchors = mine_negatives(_embedder(trainee), data, batch_anchors, matches, options.mined_negatives)
    steps = _steps(len(batch_anchors), options)
    weight = options.train_identifier_weight

    def embed(keys: list[str]) -> torch.Tensor:
        """The trainee's vectors of these records, with identifier features as the served encoder adds them."""
        dense = trainee.embed([data.inputs[key] for key in keys])
        if not weight:
            return dense
        codes = torch.from_numpy(identifier_vectors(data.inputs[key].text for key in keys)).to(dense)
        return torch.cat([math.sqrt(1 - weight) * F.normalize(dense, dim=-1), math.sqrt(weight) * codes], dim=-1)

    def step_loss(step: int) -> torch.Tensor:
        batch = _batch(batch_anchors, step, options.batch_size, options.seed)
        pick = random.Random(options.seed * 1_000_003 + step)
        owners = [i for i, a in enumerate(batch) if a.hard_negatives]
        negatives = [pick.choice(batch[i].hard_negatives) for i in owners]
        mined = [pick.choice(a.mined_negatives) for a in batch if a.mined_negatives]
        documents = [a.right for a in batch] + negatives + mined
        lefts = embed([a.left for a in batch])
        rights = embed(documents)
        ignore = _known_matches(matches, [a.left for a in batch], documents, device)
        forward = info_nce(lefts, rights, ignore)
        backward = info_nce(rights[: len(batch)], lefts, ignore[:, : len(batch)].T)
        loss = (forward + backward) / 2
        if not non_matches:
            return loss
        sampled = _batch(non_matches, step, options.batch_size, options.seed + 1)
        sampled_lefts = embed([p.left for p in sampled])
        sampled_rights = embed([p.right for p in sampled])
        scores = torch.cat(
            [  # cosine of each labelled pair: matches, their hard negatives, sampled non-matches
                F.cosine_similarity(lefts, rights[: len(batch)], dim=-1),
                F.cosine_similarity(lefts[owners], rights[len(batch) : len(batch) + len(negatives)], dim=-1),
                F.cosine_similarity(sampled_lefts, sampled_rights, dim=-1),
            ]
        )
        labels = torch.tensor([1] * len(batch) + [0] * (len(negatives) + len(sampled)), device=scores.device)
        return loss + options.pair_loss_weight * cosent(scores, labels)

    per_epoch = max(1, len(batch_anchors) // options.batch_size)
    settings = replace(_loop_settings(options, steps), eval_every=options.eval_every or per_epoch)
    result = loop.run(
        "supervised",
        trainee,
        step_loss,
        folder,
        settings,
        validate=lambda: valid_score(trainee, data, weight, options.selection_metric),
        resume=resume,
    )
    return trainee, result, steps


def _known_matches(matches: set[tuple[str, str]], lefts: list[str], documents: list[str], device: str) -> torch.Tensor:
    """Cells (i, j), j != i, where document j is a labelled match of left i: not a negative for it."""
    ignore = torch.zeros(len(lefts), len(documents), dtype=torch.bool)
    for i, left in enumerate(lefts):
        for j, document in enumerate(documents):
            ignore[i, j] = j != i and (left, document) in matches
    return ignore.to(device)


def mine_negatives(
    embed: Embedder, data: TrainingData, batch_anchors: list[Anchor], matches: set[tuple[str, str]], count: int
) -> list[Anchor]:
    """Each anchor with the ``count`` tableB records of its dataset nearest its left record, matches left out.

    Only train.csv's matches are left out: an unlabelled true match among the mined records is a wrong
    negative, the price of mining on benchmarks whose tableB holds mostly one match per left record.
    """
    mined: dict[str, tuple[str, ...]] = {}
    for dataset in data.names:
        lefts = sorted({a.left for a in batch_anchors if a.left.startswith(f"{dataset}/a/")})
        rights = [key for key in data.inputs if key.startswith(f"{dataset}/b/")]
        if not lefts or not rights:
            continue
        right_vectors = _embed_in_chunks(embed, [data.inputs[key] for key in rights], f"mine {dataset}")
        scores = embed([data.inputs[key] for key in lefts]) @ right_vectors.T
        for left, row in zip(lefts, scores, strict=True):
            nearest = (rights[j] for j in np.argsort(-row, kind="stable"))
            mined[left] = tuple(itertools.islice((key for key in nearest if (left, key) not in matches), count))
    log.info("mined %d negatives for each of %d left records", count, len(mined))
    return [replace(a, mined_negatives=mined.get(a.left, ())) for a in batch_anchors]


def _embedder(trainee: EmbeddingTrainee, identifier_weight: float = 0.0, batch_size: int = 64) -> Embedder:
    """The trainee's current embeddings, without gradients, as unit rows (with identifier features if weighted)."""

    def embed(inputs: list[EncoderInput]) -> np.ndarray:
        trainee.module.train(False)
        with torch.no_grad():
            chunks = [trainee.embed(inputs[i : i + batch_size]).cpu() for i in range(0, len(inputs), batch_size)]
        rows = F.normalize(torch.cat(chunks), dim=-1).numpy()
        if not identifier_weight:
            return rows
        return combine(rows, identifier_vectors(item.text for item in inputs), identifier_weight)

    return embed


def valid_score(
    trainee: EmbeddingTrainee, data: TrainingData, identifier_weight: float = 0.0, metric: str = "f1"
) -> float:
    """Best-threshold F1 (or another ``SELECTION_METRICS`` entry) of cosine scores over valid.csv (mean over
    datasets), from the trainee's embeddings."""
    return _valid_score(data, _embedder(trainee, identifier_weight), metric)


def validate_encoder(spec: EncoderSpec, data: TrainingData, device: str) -> float:
    """Valid F1 through the serving encoder (what ``llmatch serve`` would load from the stage folder)."""
    encoder = load_encoder(spec, device)
    return _valid_score(data, lambda inputs: encoder.encode(inputs, batch_size=spec.batch_size))


def select_identifier_weight(
    spec: EncoderSpec, data: TrainingData, device: str, weights: Sequence[float], metric: str = "f1"
) -> list[dict[str, float]]:
    """Valid F1 (and ``metric`` when it is another) of the trained encoder with each candidate identifier weight
    (identifiers.py), in order.

    The dense vectors are embedded once; each weight only recombines them with the identifier features, exactly
    as the serving encoder will.
    """
    dense_spec = replace(spec, identifier_weight=0.0)
    encoder = load_encoder(dense_spec, device)
    valid = []
    for dataset, pairs in data.splits["valid"].items():
        keys = sorted({key for pair in pairs for key in (pair.left, pair.right)})
        inputs = [data.inputs[key] for key in keys]
        dense = _embed_in_chunks(
            lambda chunk: encoder.encode(chunk, batch_size=spec.batch_size), inputs, f"valid {dataset}"
        )
        valid.append((pairs, keys, dense, identifier_vectors([item.text for item in inputs], spec.identifier_dims)))
    selection = []
    for weight in sorted(set(weights)):
        row: dict[str, float] = {"weight": weight}
        for name in dict.fromkeys(("f1", metric)):
            value = np.mean(
                [
                    _pair_score(pairs, keys, combine(dense, codes, weight) if weight else dense, name)
                    for pairs, keys, dense, codes in valid
                ]
            )
            row[f"valid_{name}"] = round(float(value), 4)
        selection.append(row)
    return selection


def _valid_score(data: TrainingData, embed: Embedder, metric: str = "f1") -> float:
    """Mean over datasets of the best-threshold F1 (or ``metric``) of cosine scores on valid.csv."""
    scores = []
    for dataset, pairs in data.splits["valid"].items():
        keys = sorted({key for pair in pairs for key in (pair.left, pair.right)})
        vectors = _embed_in_chunks(embed, [data.inputs[key] for key in keys], f"valid {dataset}")
        scores.append(_pair_score(pairs, keys, vectors, metric))
    return float(np.mean(scores))


def _embed_in_chunks(embed: Embedder, inputs: list[EncoderInput], description: str) -> np.ndarray:
    """``embed`` over many inputs, with a progress bar."""
    chunks = []
    with tqdm(total=len(inputs), desc=description, unit=" records", leave=False) as bar:
        for start in range(0, len(inputs), CHUNK):
            chunks.append(embed(inputs[start : start + CHUNK]))
            bar.update(len(chunks[-1]))
    return np.concatenate(chunks)


def _pair_score(pairs: Sequence[TextPair], keys: list[str], matrix: np.ndarray, metric: str = "f1") -> float:
    """``SELECTION_METRICS[metric]`` of the pairs' cosines, ``matrix`` holding the unit rows of ``keys``."""
    row = {key: i for i, key in enumerate(keys)}
    left = matrix[[row[p.left] for p in pairs]]
    right = matrix[[row[p.right] for p in pairs]]
    scores = np.sum(left * right, axis=1)
    return SELECTION_METRICS[metric](scores, np.array([p.label for p in pairs]))


def _loop_settings(options: StageOptions, steps: int) -> loop.LoopSettings:
    return loop.LoopSettings(
        steps=steps,
        learning_rate=options.learning_rate,
        seed=options.seed,
        checkpoint_every=options.checkpoint_every,
        eval_every=options.eval_every,
        metric=f"valid_{options.selection_metric}",
        on_step=options.on_step,
    )
