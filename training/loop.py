"""One optimisation loop for every stage: AdamW with warm-up, progress bar, resumable checkpoints, best-on-valid."""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.trainees import Trainee

log = logging.getLogger("llmatch.train")

CHECKPOINT_FOLDER = "checkpoint"


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    learning_rate: float
    seed: int = 42
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50  # steps; a run killed in between resumes from the last checkpoint
    eval_every: int | None = None  # steps between valid evaluations (selection); None: only at the end
    metric: str = "valid_f1"  # the name of what ``validate`` returns, in the evaluations and the log
    on_step: Callable[[int, int], None] | None = None  # (steps done, steps in all), after each step


@dataclass
class LoopResult:
    losses: list[float]
    seconds: float
    best_step: int | None = None  # the step whose weights were kept (best valid score), when selecting
    valid_score: float | None = None  # the best of ``validate`` (``LoopSettings.metric``), when selecting
    evaluations: list[dict[str, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(
    stage: str,
    trainee: Trainee,
    step_loss: Callable[[int], torch.Tensor],
    folder: Path,
    settings: LoopSettings,
    validate: Callable[[], float] | None = None,
    resume: bool = False,
) -> LoopResult:
    """Minimise ``step_loss(step)`` for ``settings.steps`` steps and leave the kept weights in ``folder``.

    With ``validate``, the weights are evaluated before training, every ``eval_every`` steps and at the end;
    the best valid F1 is kept (valid only: test never takes part). Without it, the final weights are kept.
    """
    folder.mkdir(parents=True, exist_ok=True)
    module = trainee.module
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate)
    scheduler = _warmup_then_linear(optimizer, settings)
    state = {"step": 0, "losses": [], "best_score": None, "best_step": None, "evaluations": [], "seconds": 0.0}
    checkpoint = folder / CHECKPOINT_FOLDER / "state.pt"
    if resume and checkpoint.is_file():
        state = _load_checkpoint(checkpoint, trainee, optimizer, scheduler)
        log.info("%s: resuming at step %d of %d", stage, state["step"], settings.steps)
    else:
        seed_everything(settings.seed)
        if validate is not None:
            _evaluate(stage, trainee, validate, folder, state, settings.metric)
    started = time.perf_counter() - state["seconds"]
    module.train()
    with tqdm(total=settings.steps, initial=state["step"], desc=stage, unit=" steps") as bar:
        while state["step"] < settings.steps:
            loss = step_loss(state["step"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["losses"].append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{state['losses'][-1]:.4f}")
            if settings.on_step is not None:
                settings.on_step(state["step"], settings.steps)
            if validate is not None and _due(state["step"], settings.eval_every, settings.steps):
                _evaluate(stage, trainee, validate, folder, state, settings.metric)
                module.train()
            if state["step"] % settings.checkpoint_every == 0 and state["step"] < settings.steps:
                state["seconds"] = time.perf_counter() - started
                _save_checkpoint(checkpoint, trainee, optimizer, scheduler, state)
    module.train(False)
    if validate is None:
        trainee.save(folder)
    shutil.rmtree(folder / CHECKPOINT_FOLDER, ignore_errors=True)
    return LoopResult(
        losses=state["losses"],
        seconds=round(time.perf_counter() - started, 1),
        best_step=state["best_step"],
        valid_score=state["best_score"],
        evaluations=state["evaluations"],
    )


def _due(step: int, every: int | None, total: int) -> bool:
    return step == total or bool(every and step % every == 0)


def _evaluate(
    stage: str, trainee: Trainee, validate: Callable[[], float], folder: Path, state: dict, metric: str
) -> None:
    """Score the current weights on valid; save them into ``folder`` when they are the best so far."""
    trainee.module.train(False)
    with torch.no_grad():
        score = float(validate())
    state["evaluations"].append({"step": state["step"], metric: round(score, 4)})
    improved = state["best_score"] is None or score > state["best_score"]
    kept = " (best so far: kept)" if improved else ""
    log.info("%s: step %d %s %.4f%s", stage, state["step"], metric.replace("_", " "), score, kept)
    if improved:
        state["best_score"], state["best_step"] = score, state["step"]
        trainee.save(folder)


def _warmup_then_linear(optimizer: torch.optim.Optimizer, settings: LoopSettings):
    warmup = max(1, int(settings.steps * settings.warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _trainable_state(trainee: Trainee) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainee.module.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, trainee: Trainee, optimizer, scheduler, state: dict) -> None:
    """Write atomically: a run killed while saving keeps the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "weights": _trainable_state(trainee),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    partial = path.with_suffix(".partial")
    torch.save(payload, partial)
    partial.replace(path)


def _load_checkpoint(path: Path, trainee: Trainee, optimizer, scheduler) -> dict:
    payload = torch.load(path, weights_only=False)
    missing = set(_trainable_state(trainee)) - set(payload["weights"])
    if missing:
        raise ValueError(f"{path} does not match this model ({len(missing)} trainable tensors missing)")
    trainee.module.load_state_dict(payload["weights"], strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    np.random.set_state(payload["rng"]["numpy"])
    random.setstate(payload["rng"]["python"])
    state = payload["state"]
    if "best_f1" in state:  # a checkpoint written before selection scores were named
        state["best_score"] = state.pop("best_f1")
    return state
