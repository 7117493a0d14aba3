"""The ``llmatch train`` command: resolve the base encoder, size the settings for the device, run the stages."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from encoding.llm2vec import UnsupportedModelError
from encoding.manifest import ManifestError, is_trained_folder, read_manifest
from encoding.recipe import render_options
from encoding.registry import (
    EncoderSpec,
    EncoderUnavailableError,
    UnknownEncoderError,
    configured_specs,
    resolve_device,
    spec_from_options,
)
from evaluation.deepmatcher import DatasetError
from llmatch.settings import Settings
from training import data as training_data
from training.options import STAGES, LoraSettings, StageError, StageOptions, require_llm2vec

log = logging.getLogger("llmatch.train")

# Per stage and kind: (learning rate, batch size on a GPU, batch size on a CPU). LoRA stages follow LLM2Vec;
# full fine-tuning of a sentence-transformers model at 1e-4 beat 3e-5 on valid F1 (docs/results.md, section 3).
DEFAULTS = {
    ("mntp", "llm2vec"): (5e-5, 32, 8),
    ("simcse", "llm2vec"): (3e-5, 64, 8),
    ("supervised", "llm2vec"): (2e-4, 32, 8),
    ("simcse", "sentence-transformers"): (3e-5, 64, 32),
    ("supervised", "sentence-transformers"): (1e-4, 64, 32),
}
CPU_LLM_MAX_LENGTH = 128  # tokens: keeps an LLM's step time on a 2-core CPU in seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_dirs", type=Path, nargs="+", metavar="DATASET_DIR", help="DeepMatcher folders")
    parser.add_argument(
        "--base", default=None, help="encoder name, trained folder or model folder (default: the default encoder)"
    )
    parser.add_argument(
        "--stages", default="supervised,identifiers", help=f"comma-separated, in order, from {', '.join(STAGES)}"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder; each stage writes OUT/<stage>")
    parser.add_argument(
        "--serialization", choices=("tagged", "plain"), default=None, help="default: as --base was trained, or tagged"
    )
    parser.add_argument(
        "--instruction", default=None, help="instruction the records are embedded with (default: as --base was trained)"
    )
    parser.add_argument("--epochs", type=float, default=None, help="passes over the data (supervised: 3; else 1)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap on steps per stage (mntp/simcse on CPU: 100)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per record (LLM on CPU: 128)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--pair-loss-weight",
        type=float,
        default=1.0,
        help="supervised: weight of the CoSENT term over labelled pairs, non-matches included (0: InfoNCE only)",
    )
    parser.add_argument(
        "--mined-negatives",
        type=int,
        default=0,
        help="supervised: per match, how many tableB records nearest its left record (by the base model; "
        "train.csv matches left out) to mine as extra negatives (0: none)",
    )
    parser.add_argument(
        "--identifier-weights",
        default="0,0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5",
        help="identifiers: candidate weights of identifier features (model numbers; see README) in the cosine; "
        "the one with the best valid F1 is kept in the manifest (0: off)",
    )
    parser.add_argument(
        "--train-identifier-weight",
        type=float,
        default=0.0,
        help="supervised: train on cosines that already include identifier features at this weight (0: dense)",
    )
    parser.add_argument("--eval-every", type=int, default=None, help="supervised: steps between valid evaluations")
    parser.add_argument(
        "--no-validation",
        action="store_true",
        help="mntp/simcse: skip the valid-F1 measurement (it embeds every valid record; supervised always runs it)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from training.stages import BaseEncoder, run_stage  # torch: imported only when training

    try:
        stages = parse_stages(args.stages)
        base = resolve_base(args.base or settings.default_encoder, settings)
        serialization, instruction = render_options(args.base, args.serialization, args.instruction)
        data = training_data.load(args.dataset_dirs, serialization, instruction)
        device = resolve_device(settings.device)
        # every stage's options are checked before the first one trains (a stage keeps its base's model kind)
        options = {stage: stage_options(stage, base.spec, args, device) for stage in stages}
    except (StageError, DatasetError, ManifestError, UnknownEncoderError, EncoderUnavailableError) as error:
        print(f"llmatch train: {error}")
        return 2
    out = args.out or settings.models_dir / "trained" / default_folder_name(data.names, base.spec.name)
    log.info("stages %s from base %s on %s (%s), into %s", stages, base.spec.name, ", ".join(data.names), device, out)
    for stage in stages:
        folder = out / stage
        if args.resume and is_trained_folder(folder):
            log.info("%s: already complete in %s, skipped", stage, folder)
            history = tuple(read_manifest(folder)["stages"])
            base = BaseEncoder(spec_from_options(stage, folder), history, base.base_model)
            continue
        try:
            base = run_stage(stage, base, data, options[stage], folder, device, resume=args.resume)
        except (StageError, UnsupportedModelError) as error:
            print(f"llmatch train: {error}")
            return 2
    print(f"trained encoder: {out / stages[-1]}")
    print("name it in LLMATCH_ENCODERS, or pass the folder to `llmatch evaluate --encoder`")
    return 0


def parse_stages(text: str) -> list[str]:
    stages = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [stage for stage in stages if stage not in STAGES]
    if not stages or unknown:
        raise StageError(f"--stages takes a comma-separated list of {', '.join(STAGES)}; got {text!r}")
    if len(set(stages)) != len(stages):
        raise StageError(f"--stages names a stage twice: {text!r}")
    return stages


def resolve_base(name: str, settings: Settings):
    """A configured encoder name, a folder written by ``llmatch train``, or a model folder."""
    from training.stages import BaseEncoder

    path = Path(name).expanduser()
    if is_trained_folder(path):
        manifest = read_manifest(path)
        return BaseEncoder(spec_from_options(path.name, path), tuple(manifest["stages"]), manifest["base_model"])
    specs = configured_specs(settings)
    if name in specs:
        spec = specs[name]
    elif path.is_dir():
        kind = "sentence-transformers" if (path / "modules.json").is_file() else "llm2vec"
        spec = EncoderSpec(path.name, kind, str(path.resolve()))
    else:
        raise UnknownEncoderError(
            f"--base {name!r} is neither a configured encoder ({', '.join(sorted(specs))}) nor a folder"
        )
    if not spec.available:
        raise EncoderUnavailableError(f"encoder {spec.name!r}: model folder {spec.model} does not exist")
    return BaseEncoder(spec)


def stage_options(stage: str, spec: EncoderSpec, args: argparse.Namespace, device: str) -> StageOptions:
    """The user's choices, with defaults by stage, model kind and device (small settings on a CPU)."""
    if stage == "identifiers":  # trains nothing: only the candidate weights matter
        return StageOptions(
            batch_size=1, learning_rate=0.0, seed=args.seed, identifier_weights=parse_weights(args.identifier_weights)
        )
    if (stage, spec.kind) not in DEFAULTS:
        require_llm2vec(stage, spec.name, spec.kind)
    learning_rate, gpu_batch, cpu_batch = DEFAULTS[(stage, spec.kind)]
    if args.pair_loss_weight < 0:
        raise StageError(f"--pair-loss-weight is a weight, 0 or more; got {args.pair_loss_weight}")
    if args.mined_negatives < 0:
        raise StageError(f"--mined-negatives is a count, 0 or more; got {args.mined_negatives}")
    if not 0.0 <= args.train_identifier_weight < 1.0:
        raise StageError(f"--train-identifier-weight lies from 0 to below 1; got {args.train_identifier_weight}")
    on_cpu = not device.startswith("cuda")
    max_length = args.max_length or (CPU_LLM_MAX_LENGTH if on_cpu and spec.kind == "llm2vec" else None)
    max_steps = args.max_steps or (100 if on_cpu and stage != "supervised" else None)
    return StageOptions(
        batch_size=args.batch_size or (cpu_batch if on_cpu else gpu_batch),
        learning_rate=args.learning_rate or learning_rate,
        epochs=args.epochs or (3.0 if stage == "supervised" else 1.0),
        max_steps=max_steps,
        max_length=max_length,
        seed=args.seed,
        lora=LoraSettings(rank=args.lora_rank, alpha=2 * args.lora_rank),
        pair_loss_weight=args.pair_loss_weight,
        eval_every=args.eval_every,
        mined_negatives=args.mined_negatives,
        train_identifier_weight=args.train_identifier_weight,
        validate=not args.no_validation,
        gradient_checkpointing=not on_cpu and spec.kind == "llm2vec",
    )


def parse_weights(text: str) -> tuple[float, ...]:
    """``--identifier-weights``: comma-separated numbers in [0, 1)."""
    try:
        weights = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        weights = ()
    if not weights or not all(0.0 <= weight < 1.0 for weight in weights):
        raise StageError(f"--identifier-weights takes comma-separated numbers from 0 to below 1; got {text!r}")
    return weights


def default_folder_name(datasets: list[str], base_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{'+'.join(datasets)}-{base_name}")[:120]
