"""Valid-only ablation of the identifier rules: valid F1 with every rule, and with each one switched off.

Usage: python -m evaluation.ablation DATASET_DIR... [--encoder NAME|FOLDER] [--weights 0,0.05,...] [--out FILE]

For each benchmark the encoder's dense vectors of the records that ``valid.csv`` names are computed once; each
variant of the rules (``encoding/identifiers.py``: digit runs, hyphens dropped, stems) then
recombines them with its own identifier features at every candidate weight, exactly as the serving encoder
does, and keeps the weight with the best valid F1 (the smallest among equals, as the ``identifiers`` stage
does). ``test.csv`` is never read: this is the measurement a rule is kept or dropped on.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from encoding.identifiers import IdentifierRules, combine, identifier_vectors
from encoding.manifest import is_trained_folder
from encoding.recipe import Recipe, record_input, render_options
from encoding.registry import configured_specs, load_encoder, resolve_device, spec_from_options
from encoding.render import RenderConfig
from evaluation import deepmatcher
from llmatch.settings import Settings, get_settings
from matching.calibration import best_f1_threshold

log = logging.getLogger("llmatch.ablation")

VARIANTS = {
    "all rules (default)": IdentifierRules(),
    "without digit runs": IdentifierRules(digit_runs=False),
    "without dropping hyphens": IdentifierRules(drop_hyphens=False),
    "without stems": IdentifierRules(stems=False),
    "none of the three": IdentifierRules(digit_runs=False, drop_hyphens=False, stems=False),
}
WEIGHTS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)  # the identifiers stage's default candidates


@dataclass(frozen=True)
class ValidData:
    """A benchmark's valid pairs as row indices into its rendered valid records."""

    name: str
    texts: list[str]
    dense: np.ndarray  # unit rows, one per text
    left: np.ndarray
    right: np.ndarray
    labels: np.ndarray


def valid_f1(data: ValidData, vectors: np.ndarray) -> float:
    """Best-threshold F1 of the pairs' cosines (the threshold the service would choose on these pairs)."""
    scores = np.sum(vectors[data.left] * vectors[data.right], axis=1).astype(np.float64)
    return best_f1_threshold(scores, data.labels).f1


def ablate(data: ValidData, weights: tuple[float, ...], dims: int) -> list[dict[str, Any]]:
    """For each variant: valid F1 at every weight, and the chosen weight with its F1."""
    rows = []
    for variant, rules in VARIANTS.items():
        codes = identifier_vectors(data.texts, dims, rules)
        by_weight = {w: valid_f1(data, combine(data.dense, codes, w) if w else data.dense) for w in sorted(weights)}
        best = max(by_weight, key=lambda w: by_weight[w])  # dict order is ascending: the smallest among equals
        rows.append(
            {
                "dataset": data.name,
                "variant": variant,
                "rules": asdict(rules),
                "weight": best,
                "valid_f1": round(by_weight[best], 4),
                "valid_f1_by_weight": {f"{w:g}": round(f1, 4) for w, f1 in by_weight.items()},
            }
        )
    return rows


def load_valid(folder: Path, encode, serialization: str, instruction: str | None) -> ValidData:
    """Render the records ``valid.csv`` names as the service would, and embed them once."""
    benchmark = deepmatcher.load(folder)
    recipe = Recipe(RenderConfig(serialization, benchmark.attributes, instruction))
    tables = {"a": {r["id"]: r for r in benchmark.table_a}, "b": {r["id"]: r for r in benchmark.table_b}}
    keys = sorted({("a", p.left_id) for p in benchmark.valid} | {("b", p.right_id) for p in benchmark.valid})
    row = {key: i for i, key in enumerate(keys)}
    inputs = [record_input(tables[source][rid]["attributes"], recipe).item for source, rid in keys]
    return ValidData(
        name=benchmark.name,
        texts=[item.text for item in inputs],
        dense=encode(inputs),
        left=np.array([row[("a", p.left_id)] for p in benchmark.valid]),
        right=np.array([row[("b", p.right_id)] for p in benchmark.valid]),
        labels=np.array([p.label for p in benchmark.valid]),
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    reference = {r["dataset"]: r["valid_f1"] for r in rows if r["variant"] == next(iter(VARIANTS))}
    lines = [
        "| dataset | rules | chosen weight | valid F1 | change against all rules |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        change = r["valid_f1"] - reference[r["dataset"]]
        lines.append(f"| {r['dataset']} | {r['variant']} | {r['weight']:g} | {r['valid_f1']:.3f} | {change:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, settings: Settings | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dirs", type=Path, nargs="+")
    parser.add_argument("--encoder", help="a configured encoder name or an `llmatch train` folder (default: minilm)")
    parser.add_argument("--serialization", choices=("tagged", "plain"))
    parser.add_argument("--instruction")
    parser.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS), help="candidate identifier weights")
    parser.add_argument("--out", type=Path, help="also write every row, with F1 at each weight, as JSON")
    args = parser.parse_args(argv)
    settings = settings or get_settings()
    try:
        weights = tuple(float(w) for w in args.weights.split(","))
    except ValueError:
        parser.error(f"--weights takes comma-separated numbers; got {args.weights!r}")
    if not all(0.0 <= w < 1.0 for w in weights):
        parser.error("--weights must lie from 0 to below 1")
    encoder = args.encoder or settings.default_encoder
    serialization, instruction = render_options(encoder, args.serialization, args.instruction)
    specs = configured_specs(settings)
    if is_trained_folder(encoder):
        spec = spec_from_options(Path(encoder).name, encoder)
    elif encoder in specs:
        spec = specs[encoder]
    else:
        parser.error(f"unknown encoder {encoder!r}: name a configured encoder or an `llmatch train` folder")
    dense = load_encoder(replace(spec, identifier_weight=0.0), resolve_device(settings.device))
    rows = []
    for folder in args.dataset_dirs:
        try:
            data = load_valid(
                folder, lambda inputs: dense.encode(inputs, batch_size=spec.batch_size), serialization, instruction
            )
        except deepmatcher.DatasetError as error:
            parser.error(str(error))
        log.info("%s: %d valid records embedded", data.name, len(data.texts))
        rows += ablate(data, weights, spec.identifier_dims)
    print(markdown(rows), end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"encoder": encoder, "serialization": serialization, "instruction": instruction, "rows": rows}
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise SystemExit(main())
