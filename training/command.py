"""The ``llmatch train`` command: resolve the base encoder, size the settings for the device, run the stages."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
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
    parser.add_argument(
        "dataset_dirs",
        type=Path,
        nargs="*",
        metavar="DATASET_DIR",
        help="DeepMatcher folders to train on here (or --dataset: a job on a running service)",
    )
    service = parser.add_argument_group(
        "a training job on a running service", "train on a dataset's stored labels where its encoder runs, and wait"
    )
    service.add_argument(
        "--dataset", default=None, metavar="NAME", help="POST /datasets/NAME/train, then follow the job to its end"
    )
    service.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    service.add_argument("--key", default=os.environ.get("LLMATCH_API_KEY"), help="API key (env LLMATCH_API_KEY)")
    service.add_argument(
        "--cancel", action="store_true", help="cancel the dataset's unfinished job (DELETE /datasets/NAME/train)"
    )
    service.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    parser = parser.add_argument_group("training on DeepMatcher folders")
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
        "--selection-metric",
        choices=("f1", "average_precision"),
        default="f1",
        help="supervised and identifiers: choose the checkpoint and the identifier weight on valid best-threshold F1 "
        "or on average precision (steadier on a few hundred valid pairs; training jobs use it)",
    )
    parser.add_argument(
        "--no-validation",
        action="store_true",
        help="mntp/simcse: skip the valid-F1 measurement (it embeds every valid record; supervised always runs it)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")


def run(args: argparse.Namespace, settings: Settings) -> int:
    refusal = check_mode(args)
    if refusal:
        print(f"llmatch train: {refusal}", file=sys.stderr)
        return 2
    if args.dataset is not None:
        return cancel_job(args) if args.cancel else run_job(args)
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


def run_job(args: argparse.Namespace) -> int:
    """``--dataset NAME``: start a training job on the service and wait for its end with a progress bar. 0 when
    it ends done (its version adopted or not), 1 when it fails or is cancelled, 2 when the start is refused."""
    from llmatch.client import TrainingError, follow_training

    def started(job: dict) -> None:
        print(f"training job {job['id']} of {args.dataset}: queued with {job['labels']} labels", flush=True)

    try:
        job = follow_training(
            args.url, args.dataset, args.key, poll_seconds=args.poll_seconds, progress=True, started=started
        )
    except TrainingError as error:
        if error.method == "POST" and error.refused:
            print(f"llmatch train: {error.detail}", file=sys.stderr)
            return 2
        print(f"llmatch train: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"\nstopped waiting; the job goes on. Follow it with GET {args.url}/datasets/{args.dataset}/train, "
            f"cancel it with `llmatch train --dataset {args.dataset} --cancel`.",
            file=sys.stderr,
        )
        return 130
    print(describe_job(job))
    return 0 if job["status"] == "done" else 1


def cancel_job(args: argparse.Namespace) -> int:
    """``--dataset NAME --cancel``: cancel the dataset's unfinished job; 2 when there is none."""
    from llmatch.client import TrainingError, cancel_training
    from llmatch.terminal import api_client

    try:
        with api_client(args.url, args.key) as client:
            job = cancel_training(client, args.dataset)
    except TrainingError as error:
        print(f"llmatch train: {error.detail}", file=sys.stderr)
        return 2 if error.refused else 1
    if job["status"] == "cancelled":
        print(f"training job {job['id']} of {args.dataset}: cancelled")
    else:
        print(f"training job {job['id']} of {args.dataset}: asked to stop ({job['status']}); its worker ends it soon")
    return 0


def describe_job(job: dict) -> str:
    """A job's end state for people: status, version, adoption, held-out metrics one per line, error."""
    adopted = {True: "yes", False: "no (the current version keeps serving)", None: "-"}[job.get("adopted")]
    lines = [
        f"status: {job['status']}",
        f"version: {job.get('version') or '-'}",
        f"adopted: {adopted}",
    ]
    metrics = flat_metrics(job.get("metrics") or {})
    if metrics:
        lines.append("held-out metrics:")
        width = max(len(name) for name, _ in metrics)
        lines += [f"  {name.ljust(width)}  {value}" for name, value in metrics]
    if job.get("error"):
        lines.append(f"error: {job['error']}")
    return "\n".join(lines)


def flat_metrics(metrics: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested metrics as (dotted name, shown value) pairs, in their order."""
    shown: list[tuple[str, str]] = []
    for name, value in metrics.items():
        if isinstance(value, dict):
            shown += flat_metrics(value, f"{prefix}{name}.")
        elif isinstance(value, float):
            shown.append((f"{prefix}{name}", f"{value:.4f}"))
        else:
            shown.append((f"{prefix}{name}", "-" if value is None else str(value)))
    return shown


def check_mode(args: argparse.Namespace) -> str | None:
    """Why the arguments name neither or both ways of training (folders here, or a job on a service); None if
    they name one."""
    if args.dataset is None:
        if args.cancel:
            return "--cancel needs --dataset NAME (the dataset whose training job to cancel)"
        if not args.dataset_dirs:
            return (
                "give DATASET_DIR folders to train on here, or --dataset NAME to train on a running service's "
                "stored labels"
            )
        return None
    if args.dataset_dirs:
        return "give either DATASET_DIR folders (training here) or --dataset NAME (a job on a service), not both"
    local = [option for option, default in local_defaults().items() if getattr(args, option) != default]
    if local:
        names = ", ".join("--" + option.replace("_", "-") for option in local)
        return f"{names} only apply to training on DATASET_DIR folders; a job on a service chooses its own settings"
    return None


def local_defaults() -> dict[str, object]:
    """The options of training on folders, with their defaults."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args(["x"]))
    return {k: v for k, v in defaults.items() if k not in REMOTE_OPTIONS}


REMOTE_OPTIONS = ("dataset_dirs", "dataset", "url", "key", "cancel", "poll_seconds")


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
            batch_size=1,
            learning_rate=0.0,
            seed=args.seed,
            identifier_weights=parse_weights(args.identifier_weights),
            selection_metric=args.selection_metric,
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
        selection_metric=args.selection_metric,
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
