"""Training data: benchmark records rendered exactly as the service renders them, and their labelled pairs."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from encoding.encoder import EncoderInput
from encoding.recipe import Recipe, record_input
from encoding.render import RenderConfig
from evaluation import deepmatcher


@dataclass(frozen=True)
class TextPair:
    """A labelled pair of records, as keys (dataset/source/id) and rendered inputs."""

    left: str
    right: str
    label: int


@dataclass
class TrainingData:
    """Rendered records of one or more benchmarks, keyed ``dataset/source/id``, and their labelled pairs."""

    names: list[str]
    serialization: str
    instruction: str | None
    inputs: dict[str, EncoderInput] = field(default_factory=dict)
    splits: dict[str, dict[str, list[TextPair]]] = field(default_factory=lambda: defaultdict(dict))

    def record_inputs(self) -> list[EncoderInput]:
        """Every distinct non-empty record input, in a stable order (for MNTP and SimCSE)."""
        unique = {item.text: item for item in self.inputs.values() if item.text.strip()}
        return [unique[text] for text in sorted(unique)]

    def pairs(self, split: str) -> list[TextPair]:
        """The pairs of a split over all datasets."""
        return [pair for per_dataset in self.splits[split].values() for pair in per_dataset]

    def describe(self) -> list[dict]:
        """What the manifest records about the data."""
        return [
            {
                "dataset": name,
                "records": sum(1 for key in self.inputs if key.startswith(f"{name}/")),
                **{f"{split}_pairs": len(self.splits[split].get(name, [])) for split in ("train", "valid")},
            }
            for name in self.names
        ]


def load(folders: list[Path], serialization: str, instruction: str | None) -> TrainingData:
    """Read DeepMatcher folders; raises ``deepmatcher.DatasetError`` naming the file and problem."""
    data = TrainingData([], serialization, instruction)
    for folder in folders:
        benchmark = deepmatcher.load(folder)
        if benchmark.name in data.names:
            raise deepmatcher.DatasetError(f"{folder}: dataset {benchmark.name!r} is given twice")
        data.names.append(benchmark.name)
        recipe = Recipe(RenderConfig(serialization, benchmark.attributes, instruction))
        for source, table in (("a", benchmark.table_a), ("b", benchmark.table_b)):
            for record in table:
                key = f"{benchmark.name}/{source}/{record['id']}"
                data.inputs[key] = record_input(record["attributes"], recipe).item
        for split, pairs in benchmark.splits.items():
            data.splits[split][benchmark.name] = [
                TextPair(f"{benchmark.name}/a/{p.left_id}", f"{benchmark.name}/b/{p.right_id}", p.label) for p in pairs
            ]
    return data
