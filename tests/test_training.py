"""`llmatch train` on the CPU: every stage lowers its loss, adapters reload exactly, supervision raises valid F1."""

from __future__ import annotations

import csv
import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from separable import write_separable_benchmark
from tiny_llama import build_tiny_llama, build_tiny_non_llama

from encoder_worker.worker import EncoderWorker
from encoding.encoder import EncoderInput
from encoding.llm2vec import LLM2VecEncoder
from encoding.manifest import encoder_options, read_manifest
from encoding.registry import EncoderPool, EncoderSpec, configured_specs, load_encoder
from evaluation import deepmatcher
from llmatch.cli import main
from llmatch.db import make_engine
from llmatch.migrate import upgrade_to_head
from llmatch.settings import Settings
from service.app import create_app
from training import data as training_data
from training import loop, stages
from training.losses import cosent, info_nce
from training.options import LoraSettings, StageOptions
from training.stages import BaseEncoder, anchors, mine_negatives, run_stage
from training.trainees import LLM2VecTrainee

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_BENCHMARK = REPO_ROOT / "tests" / "data" / "abt_buy_small"
INSTRUCTION = "Represent the product listing for finding the same product"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="module")
def separable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_separable_benchmark(tmp_path_factory.mktemp("separable") / "separable", lefts=160)


def tiny_base(folder: Path) -> BaseEncoder:
    return BaseEncoder(EncoderSpec("tiny", "llm2vec", str(folder)))


def options(**overrides) -> StageOptions:
    settings = {"batch_size": 8, "learning_rate": 1e-3, "max_length": 64, "lora": LoraSettings(rank=8, alpha=16)}
    return StageOptions(**(settings | overrides))


def test_mntp_then_simcse_lower_their_losses_and_chain_adapters(
    tiny_folder: Path, separable: Path, tmp_path: Path
) -> None:
    data = training_data.load([separable], "tagged", None)
    mntp = run_stage("mntp", tiny_base(tiny_folder), data, options(max_steps=40), tmp_path / "mntp", "cpu")
    simcse = run_stage("simcse", mntp, data, options(max_steps=30), tmp_path / "simcse", "cpu")

    first, second = read_manifest(tmp_path / "mntp"), read_manifest(tmp_path / "simcse")
    assert first["stages"][0]["loss"]["last"] < first["stages"][0]["loss"]["first"]
    assert second["stages"][1]["loss"]["last"] < second["stages"][1]["loss"]["first"]
    assert [stage["stage"] for stage in second["stages"]] == ["mntp", "simcse"]
    assert second["encoder"]["adapter"] == ["../mntp", "."]
    assert simcse.spec.adapters == (str(tmp_path / "mntp"), str(tmp_path / "simcse"))
    assert 0.0 <= second["valid_f1"] <= 1.0 and second["stages"][1]["seed"] == 42
    assert not (tmp_path / "simcse" / loop.CHECKPOINT_FOLDER).exists()

    unvalidated = tmp_path / "unvalidated"
    run_stage("simcse", mntp, data, options(max_steps=2, validate=False), unvalidated, "cpu")
    manifest = read_manifest(unvalidated)
    assert manifest["valid_f1"] is None and manifest["stages"][1]["valid_f1"] is None


def test_supervised_training_raises_valid_f1_and_keeps_the_best_checkpoint(
    tiny_folder: Path, separable: Path, tmp_path: Path
) -> None:
    data = training_data.load([separable], "tagged", None)
    settings = options(epochs=6, lora=LoraSettings())
    trained = run_stage("supervised", tiny_base(tiny_folder), data, settings, tmp_path / "sup", "cpu")

    manifest = read_manifest(tmp_path / "sup")
    evaluations = manifest["stages"][0]["evaluations"]
    untrained = evaluations[0]["valid_f1"]
    assert evaluations[0]["step"] == 0
    assert manifest["valid_f1"] == max(e["valid_f1"] for e in evaluations)
    assert manifest["valid_f1"] >= untrained + 0.15
    # What the service loads from the folder scores valid as well as the kept checkpoint did.
    encoder = load_encoder(trained.spec, "cpu")
    pairs = data.pairs("valid")
    left = encoder.encode([data.inputs[p.left] for p in pairs])
    right = encoder.encode([data.inputs[p.right] for p in pairs])
    scores = np.sum(left * right, axis=1)
    from matching.calibration import best_f1_threshold

    served = best_f1_threshold(scores, np.array([p.label for p in pairs])).f1
    assert served == pytest.approx(manifest["valid_f1"], abs=1e-3)


def test_the_pair_loss_learns_from_non_matches_whose_left_record_has_no_match(
    tiny_folder: Path, separable: Path, tmp_path: Path
) -> None:
    """Such non-matches cannot anchor InfoNCE (no positive); only the CoSENT term over labelled pairs sees them."""
    orphaned = tmp_path / "orphaned"
    shutil.copytree(separable, orphaned)
    with (separable / "train.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = [row for row in rows if (row["label"] == "1") == (int(row["ltable_id"][1:]) % 2 == 0)]
    with (orphaned / "train.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["ltable_id", "rtable_id", "label"])
        writer.writeheader()
        writer.writerows(kept)
    data = training_data.load([orphaned], "tagged", None)
    assert not any(anchor.hard_negatives for anchor in anchors(data.pairs("train")))

    valid_f1 = {}
    for weight in (0.0, 1.0):
        settings = options(epochs=12, lora=LoraSettings(), pair_loss_weight=weight)
        run_stage("supervised", tiny_base(tiny_folder), data, settings, tmp_path / f"weight-{weight}", "cpu")
        valid_f1[weight] = read_manifest(tmp_path / f"weight-{weight}")["valid_f1"]
    assert valid_f1[1.0] >= valid_f1[0.0] + 0.1, valid_f1


def test_saved_adapter_reloads_to_identical_embeddings(tiny_folder: Path, tmp_path: Path) -> None:
    trainee = LLM2VecTrainee(str(tiny_folder), [], "cpu", 64, LoraSettings(rank=8, alpha=16))
    inputs = [EncoderInput("find duplicates:", "[title] sony tv [\\title]"), EncoderInput(None, "dell xps laptop")]
    optimizer = torch.optim.AdamW([p for p in trainee.module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        first, second = trainee.embed(inputs)
        loss = -torch.nn.functional.cosine_similarity(first, second, dim=0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trainee.module.eval()
    with torch.no_grad():
        in_memory = torch.nn.functional.normalize(trainee.embed(inputs), dim=-1).numpy()
    trainee.save(tmp_path / "adapter")

    reloaded = LLM2VecEncoder("reloaded", tiny_folder, adapter_path=[tmp_path / "adapter"], max_length=64)
    untrained = LLM2VecEncoder("untrained", tiny_folder, max_length=64)
    np.testing.assert_allclose(reloaded.encode(inputs), in_memory, atol=1e-5)
    assert not np.allclose(untrained.encode(inputs), in_memory, atol=1e-3)


def test_a_killed_run_resumes_from_its_checkpoint_with_the_same_batches(
    tiny_folder: Path, separable: Path, tmp_path: Path
) -> None:
    data = training_data.load([separable], "tagged", None)
    items = data.record_inputs()
    settings = loop.LoopSettings(steps=8, learning_rate=1e-3, checkpoint_every=3)

    def run(folder: Path, fail_at: int | None = None, resume: bool = False) -> loop.LoopResult:
        loop.seed_everything(0)
        trainee = LLM2VecTrainee(str(tiny_folder), [], "cpu", 64, LoraSettings(rank=8, alpha=16))

        def step_loss(step: int) -> torch.Tensor:
            if step == fail_at:
                raise KeyboardInterrupt  # the process is stopped in the middle of training
            batch = [items[(step * 4 + i) % len(items)] for i in range(4)]
            vectors = trainee.embed(batch)
            return torch.nn.functional.mse_loss(vectors, torch.zeros_like(vectors))

        return loop.run("test", trainee, step_loss, folder, settings, resume=resume)

    uninterrupted = run(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", fail_at=5)
    assert (tmp_path / "killed" / loop.CHECKPOINT_FOLDER / "state.pt").is_file()
    resumed = run(tmp_path / "killed", resume=True)

    assert len(resumed.losses) == 8
    np.testing.assert_allclose(resumed.losses, uninterrupted.losses, rtol=1e-4)


def test_anchors_pair_each_match_with_the_left_records_labelled_non_matches() -> None:
    pairs = [
        training_data.TextPair("d/a/1", "d/b/1", 1),
        training_data.TextPair("d/a/1", "d/b/2", 0),
        training_data.TextPair("d/a/1", "d/b/3", 0),
        training_data.TextPair("d/a/2", "d/b/2", 1),
        training_data.TextPair("d/a/3", "d/b/3", 0),
    ]
    found = {a.left: a for a in anchors(pairs)}
    assert set(found) == {"d/a/1", "d/a/2"}
    assert found["d/a/1"].right == "d/b/1" and found["d/a/1"].hard_negatives == ("d/b/2", "d/b/3")
    assert found["d/a/2"].hard_negatives == ()


def test_mined_negatives_are_the_nearest_right_records_of_the_same_dataset_but_not_train_matches() -> None:
    def angle_vectors(inputs: list[EncoderInput]) -> np.ndarray:  # a record's text is its angle on a circle
        angles = np.array([float(item.text) for item in inputs])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)

    texts = {
        "d/a/1": "0.0",
        "d/b/1": "0.05",
        "d/b/2": "0.1",
        "d/b/3": "0.2",
        "d/b/4": "3.0",
        "e/a/1": "1.5",
        "e/b/1": "0.0",
        "e/b/2": "1.45",
    }
    data = training_data.TrainingData(
        ["d", "e"], "plain", None, {key: EncoderInput(None, text) for key, text in texts.items()}
    )
    given = [stages.Anchor("d/a/1", "d/b/1", ("d/b/4",)), stages.Anchor("e/a/1", "e/b/2", ())]
    mined = mine_negatives(angle_vectors, data, given, {("d/a/1", "d/b/1"), ("e/a/1", "e/b/2")}, count=2)

    assert [a.mined_negatives for a in mined] == [("d/b/2", "d/b/3"), ("e/b/1",)]
    assert [(a.left, a.right, a.hard_negatives) for a in mined] == [(a.left, a.right, a.hard_negatives) for a in given]


def test_supervised_training_with_mined_negatives_records_them(
    tiny_folder: Path, separable: Path, tmp_path: Path
) -> None:
    data = training_data.load([separable], "tagged", None)
    settings = options(max_steps=3, lora=LoraSettings(), mined_negatives=2)
    run_stage("supervised", tiny_base(tiny_folder), data, settings, tmp_path / "mined", "cpu")

    stage = read_manifest(tmp_path / "mined")["stages"][0]
    assert stage["options"]["mined_negatives"] == 2 and stage["steps"] == 3
    assert np.isfinite([stage["loss"]["first"], stage["loss"]["last"]]).all()


def test_train_command_fine_tunes_minilm_then_chooses_identifiers_and_evaluate_uses_the_folder(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "trained"
    assert (
        main(
            [
                "train",
                str(SMALL_BENCHMARK),
                "--base",
                "minilm",
                "--out",
                str(out),
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--serialization",
                "plain",
                "--instruction",
                INSTRUCTION,
            ]
        )
        == 0
    )  # default stages: supervised,identifiers
    dense = read_manifest(out / "supervised")
    assert dense["encoder"] == {"kind": "sentence-transformers", "model": "."}  # the trained model, dense
    assert dense["render"] == {"serialization": "plain", "instruction": INSTRUCTION}
    assert dense["stages"][0]["data"][0]["dataset"] == "abt_buy_small"
    assert "identifier_weights" not in dense["stages"][0]["options"]

    manifest = read_manifest(out / "identifiers")
    assert [stage["stage"] for stage in manifest["stages"]] == ["supervised", "identifiers"]
    selection = manifest["stages"][1]["identifier_weights"]  # every default candidate, measured on valid
    assert [row["weight"] for row in selection] == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5]
    assert selection[0]["valid_f1"] == dense["valid_f1"]  # weight 0 is the dense encoder the first stage wrote
    best = max(selection, key=lambda row: row["valid_f1"])
    assert manifest["encoder"]["identifier_weight"] == best["weight"] and manifest["valid_f1"] == best["valid_f1"]
    assert Path(encoder_options(out / "identifiers")["model"]) == (out / "supervised").resolve()
    assert "trained encoder: " + str(out / "identifiers") in capsys.readouterr().out
    settings = Settings(encoders={"abt": str(out / "identifiers")})  # LLMATCH_ENCODERS naming the folder
    assert configured_specs(settings)["abt"].identifier_weight == best["weight"]

    report_dir = tmp_path / "report"
    served = out / "identifiers"
    assert main(["evaluate", str(SMALL_BENCHMARK), "--encoder", str(served), "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["config"]["encoder"] == "trained-identifiers"
    assert report["config"]["serialization"] == "plain"
    assert report["identifier_weight"] == best["weight"]  # the served encoder is the one chosen on valid
    assert_served_as_evaluated(served, report_dir / "test_pairs.csv", tmp_path / "service")


def assert_served_as_evaluated(folder: Path, test_pairs: Path, data_dir: Path) -> None:
    """Served by name (PUT /datasets with the folder's encoder name and nothing else), the trained encoder scores
    the test pairs exactly as `llmatch evaluate` did: the dataset renders records as the folder was trained."""
    settings = Settings(
        database_url=f"sqlite:///{data_dir / 'db.sqlite3'}",
        data_dir=data_dir,
        device="cpu",
        encoders={"abt": str(folder)},
    )
    data_dir.mkdir()
    engine = make_engine(settings.resolved_database_url)
    upgrade_to_head(engine)
    engine.dispose()
    benchmark = deepmatcher.load(SMALL_BENCHMARK)
    pool = EncoderPool(settings)
    with TestClient(create_app(settings, pool=pool, run_worker=False), base_url="http://localhost") as api:
        created = api.put("/datasets/abt", json={"encoder": "abt"})
        assert created.status_code == 201
        assert (created.json()["serialization"], created.json()["instruction"]) == ("plain", INSTRUCTION)
        assert created.json()["render_warning"] is None
        for source, table in (("a", benchmark.table_a), ("b", benchmark.table_b)):
            assert api.post("/records", json={"dataset": "abt", "source": source, "records": table}).status_code == 202
        state = api.app.state.service
        EncoderWorker(state.session_factory, pool, settings).drain()
        with test_pairs.open() as handle:
            for row in csv.DictReader(handle):
                query = f"dataset=abt&left_source=a&left_id={row['left_id']}&right_source=b&right_id={row['right_id']}"
                served = api.get(f"/match?{query}").json()["score"]
                assert abs(served - float(row["score"])) < 1e-5, (row, served)
        # An explicit, different choice is kept, logged and shown.
        other = api.put("/datasets/tagged", json={"encoder": "abt", "serialization": "tagged"}).json()
        assert (other["serialization"], other["instruction"]) == ("tagged", INSTRUCTION)
        assert "trained on records rendered plain" in other["render_warning"]


def test_train_command_checks_every_stage_before_training_any(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                str(SMALL_BENCHMARK),
                "--base",
                "minilm",
                "--stages",
                "supervised,identifiers",
                "--identifier-weights",
                "0,2",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "--identifier-weights takes" in capsys.readouterr().out
    assert not out.exists()  # the supervised stage did not start


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--stages", "mntp,finetune"], "--stages takes"),
        (["--stages", "supervised,supervised"], "names a stage twice"),
        (["--base", "minilm", "--stages", "mntp"], "is a sentence-transformers model"),
        (["--base", "no-such-encoder"], "neither a configured encoder"),
        (["--pair-loss-weight", "-1"], "--pair-loss-weight is a weight"),
        (["--identifier-weights", "0,1"], "--identifier-weights takes"),
        (["--identifier-weights", "some"], "--identifier-weights takes"),
    ],
)
def test_train_command_rejects_what_it_cannot_do(arguments: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert main(["train", str(SMALL_BENCHMARK), "--out", str(tmp_path / "out"), *arguments]) == 2
    assert message in capsys.readouterr().out


def test_train_command_names_an_architecture_llm2vec_cannot_make_bidirectional(tmp_path: Path, capsys) -> None:
    gpt2 = build_tiny_non_llama(tmp_path / "gpt2")
    code = main(["train", str(SMALL_BENCHMARK), "--base", str(gpt2), "--stages", "mntp", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "only Llama, Mistral, Gemma and Qwen2" in capsys.readouterr().out


def test_train_command_reports_a_missing_dataset_folder(tmp_path: Path, capsys) -> None:
    assert main(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().out


def test_training_on_a_trained_base_renders_records_as_it_was_trained(tmp_path: Path) -> None:
    from encoding.manifest import write_manifest
    from encoding.recipe import render_options

    base = tmp_path / "simcse"
    base.mkdir()
    render = {"serialization": "plain", "instruction": "Find the same product"}
    write_manifest(base, {"encoder": {"kind": "llm2vec", "model": "."}, "render": render})

    def options(**given) -> tuple[str, str | None]:
        chosen = {"base": str(base), "serialization": None, "instruction": None, **given}
        return render_options(chosen["base"], chosen["serialization"], chosen["instruction"])

    assert options() == ("plain", "Find the same product")
    assert options(serialization="tagged", instruction="") == ("tagged", "")
    assert options(base="minilm") == ("tagged", None)


def test_stage_options_shrink_on_a_cpu(tmp_path: Path) -> None:
    from training.command import stage_options

    spec = EncoderSpec("tiny", "llm2vec", str(tmp_path))
    args = Namespace(
        max_length=None,
        max_steps=None,
        batch_size=None,
        learning_rate=None,
        epochs=None,
        seed=1,
        lora_rank=4,
        eval_every=None,
        no_validation=False,
        pair_loss_weight=1.0,
        mined_negatives=0,
        identifier_weights="0,0.2",
        train_identifier_weight=0.0,
        selection_metric="f1",
    )
    cpu = stage_options("mntp", spec, args, "cpu")
    gpu = stage_options("mntp", spec, args, "cuda")
    assert (cpu.max_length, cpu.max_steps, cpu.batch_size) == (128, 100, 8)
    assert (gpu.max_length, gpu.max_steps, gpu.gradient_checkpointing) == (None, None, True)


def test_cosent_is_small_only_when_every_match_outscores_every_non_match() -> None:
    labels = torch.tensor([1, 1, 0, 0])
    ordered = cosent(torch.tensor([0.9, 0.6, 0.5, 0.2]), labels)
    # Each record's match above its own non-match (0.9 > 0.8, 0.4 > 0.2), but not every match above every one.
    per_record_only = cosent(torch.tensor([0.9, 0.4, 0.8, 0.2]), labels)
    assert ordered < 0.2 < 1.0 < per_record_only
    assert cosent(torch.tensor([0.9, 0.1]), torch.tensor([1, 1])) == 0.0  # no non-match: nothing to order


def test_info_nce_leaves_out_ignored_cells() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    documents = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # query 1's positive equals query 0's
    plain = info_nce(queries, documents)
    ignored = info_nce(queries, documents, ignore=torch.tensor([[False, True], [True, False]]))
    assert ignored < plain
