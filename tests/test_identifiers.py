"""Identifier features: tokens, hashed vectors, their share of the cosine, the served encoder and its selection."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import records_body
from hypothesis import example, given, settings
from hypothesis import strategies as st

from encoding import identifiers
from encoding.encoder import EncoderInput
from encoding.identifiers import (
    IdentifierEncoder,
    IdentifierRules,
    combine,
    identifier_codes,
    identifier_features,
    identifier_tokens,
    identifier_vectors,
)
from encoding.manifest import encoder_options, read_manifest
from encoding.registry import EncoderPool, EncoderSpec, load_encoder, spec_from_options
from llmatch.cli import main
from llmatch.settings import Settings
from training import data as training_data
from training.options import StageOptions
from training.stages import BaseEncoder, run_stage, select_identifier_weight, validate_encoder


def test_identifier_tokens_are_codes_mixing_letters_and_digits_with_hyphens_dropped() -> None:
    text = "Sony HDR-SR10 camcorder, 1080p, 40in screen (sd-6100) by SONY x1"
    assert identifier_tokens(text) == {"hdrsr10", "1080p", "40in", "sd6100"}
    assert identifier_tokens("sd6100 SD-6100") == {"sd6100"}
    assert identifier_tokens("no codes here, only 202 and words") == set()


def test_identifier_tokens_include_runs_of_four_or_more_digits_standing_alone() -> None:
    assert identifier_tokens("wilson jones 35113 wallet, item 86210010 (2011)") == {"35113", "86210010", "2011"}
    assert identifier_tokens("model 6100 sd-6100") == {"6100", "sd6100"}  # the run inside a code stays in it
    assert identifier_tokens("1993-up, 13-1 2, $ 12.65, 4546b001, 123") == {"1993up", "4546b001"}


# The pattern the tokenizer used to search whole texts with (quadratic on "a-" * n); trained models were fitted on
# its tokens, so the linear tokenizer must find exactly what it found.
SEARCHED_PATTERN = re.compile(r"\b(?=[a-z0-9-]*\d)(?=[a-z0-9-]*[a-z])[a-z0-9][a-z0-9-]{3,}\b")
TRICKY_CHARACTERS = "ab1z09--  _.,/()\u00e9\u0663\u0130K\u212a\u00b2x"
PRODUCT_WORDS = ["sd-6100", "hdr-sr10", "1080p", "mb111lla", "-", "--", "a-", "-1", "2011", "x", "_a1b", "\u0663"]
texts_like_listings = st.lists(st.sampled_from(PRODUCT_WORDS), max_size=8).map(" ".join)
any_short_text = st.one_of(st.text(alphabet=TRICKY_CHARACTERS, max_size=40), st.text(max_size=30), texts_like_listings)


def pattern_tokens(text: str, rules: IdentifierRules) -> set[str]:
    """identifier_tokens as it was written with the searched pattern."""
    lowered = text.lower()
    codes = SEARCHED_PATTERN.findall(lowered)
    tokens = {token.replace("-", "") for token in codes} if rules.drop_hyphens else set(codes)
    return tokens | set(identifiers.DIGIT_RUN.findall(lowered)) if rules.digit_runs else tokens


@settings(max_examples=3000, deadline=None)
@given(any_short_text)
@example("abcd-\u0663")  # \d reads a non-ASCII digit right after the run
@example("\u00b2000a sd-6100_x a1b2-_ -ab12-- 12ab-\u00e9")  # \b against word characters outside [a-z0-9-]
def test_identifier_codes_are_exactly_what_the_searched_pattern_finds(text: str) -> None:
    lowered = text.lower()
    assert list(identifier_codes(lowered)) == SEARCHED_PATTERN.findall(lowered)
    for rules in (IdentifierRules(), IdentifierRules(drop_hyphens=False)):
        assert identifier_tokens(text, rules) == pattern_tokens(text, rules)


def test_identifier_tokens_of_real_listings_are_those_of_the_searched_pattern() -> None:
    folder = Path(__file__).parent / "data" / "abt_buy_small"
    texts = [" ".join(row) for table in ("tableA", "tableB") for row in csv.reader((folder / f"{table}.csv").open())]
    assert len(texts) > 300
    assert sum(bool(identifier_tokens(text)) for text in texts) > 200  # listings are full of model numbers
    for text in texts:
        assert identifier_tokens(text) == pattern_tokens(text, IdentifierRules())


def test_identifier_tokens_take_linear_time_on_texts_the_searched_pattern_takes_minutes_on() -> None:
    """A million characters of each shape (the searched pattern needs minutes for the first): under a hard
    timeout in a process of its own, far beyond what a linear scan needs even on a loaded machine."""
    script = (
        "from encoding.identifiers import identifier_tokens\n"
        "shapes = ['a-', '1-', '-a', 'a1-', 'ab_', 'a1b2_', '-', '1']\n"
        "found = [len(identifier_tokens(shape * (1_000_000 // len(shape)))) for shape in shapes]\n"
        "print(found, sorted(len(t) for t in identifier_tokens('a-' * 500_000 + '1')))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20, cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[0,", "0,", "0,", "1,", "0,", "0,", "0,", "1]", "[500001]"]


def test_identifier_features_are_each_token_and_its_stem_without_a_letter_suffix() -> None:
    assert identifier_features("apple mb111lla") == {"mb111lla", "stem:mb111"}
    assert identifier_features("onkyo TX-SR606") == {"txsr606", "stem:txsr606"}
    assert identifier_features("1080p g30") == {"1080p"}  # stem "1080" is no code; g30 is too short
    assert identifier_features("part 35113") == {"35113"}  # a digit run has no stem


def test_identifier_vectors_agree_fully_on_a_code_half_on_its_variants_and_not_on_other_codes() -> None:
    texts = ["canon cli-8m ink", "CLI8M cartridge by canon", "canon cli-8b ink", "canon pg-40 ink", "plain words"]
    rows = identifier_vectors(texts)
    assert rows.shape == (5, 1024) and rows.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rows[:4], axis=1), 1.0, rtol=1e-6)
    assert rows[0] @ rows[1] == pytest.approx(1.0)
    assert rows[0] @ rows[2] == pytest.approx(0.5)  # cli8m and cli8b share the stem cli8
    assert rows[0] @ rows[3] < 0.01  # another code: other buckets (these do not collide)
    assert not rows[4].any()


def test_identifier_buckets_do_not_depend_on_the_process() -> None:
    """Vectors are stored and compared across processes: the hash must not be Python's salted one."""
    script = "from encoding import identifiers; print(identifiers._bucket('kd55x85j', 1024))"
    root = Path(__file__).resolve().parents[1]
    buckets = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert buckets == {str(identifiers._bucket("kd55x85j", 1024))}


def test_the_combined_cosine_mixes_dense_and_identifier_cosines_by_the_weight() -> None:
    rng = np.random.default_rng(3)
    dense = rng.normal(size=(3, 8))
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    codes = identifier_vectors(["ab12 cd34", "ab12 ef56", "no code"], dims=64)
    weight = 0.3
    mixed = combine(dense, codes, weight)

    np.testing.assert_allclose(np.linalg.norm(mixed, axis=1), 1.0, rtol=1e-6)
    both = (1 - weight) * dense[0] @ dense[1] + weight * codes[0] @ codes[1]
    assert mixed[0] @ mixed[1] == pytest.approx(both, abs=1e-6)
    one_without = np.sqrt(1 - weight) * dense[0] @ dense[2]  # record 2 has no identifier: dense cosine, scaled
    assert mixed[0] @ mixed[2] == pytest.approx(one_without, abs=1e-6)


def test_an_encoder_spec_with_identifier_weight_serves_the_combined_vectors(pool: EncoderPool) -> None:
    dense_spec = pool.spec("minilm")
    spec = replace(dense_spec, name="minilm-ids", identifier_weight=0.25)
    encoder = load_encoder(spec, "cpu")
    inputs = [EncoderInput(None, "toshiba sd-6100 dvd player"), EncoderInput(None, "toshiba dvd player sd6100")]

    assert isinstance(encoder, IdentifierEncoder) and encoder.dim == 384 + 1024
    dense = pool.encode("minilm", inputs)
    expected = combine(dense, identifier_vectors([item.text for item in inputs]), 0.25)
    np.testing.assert_allclose(encoder.encode(inputs), expected, atol=1e-5)
    assert spec.key != dense_spec.key  # another vector: another content cache
    assert replace(dense_spec, identifier_dims=64).key == dense_spec.key  # weight 0: the feature is off


def test_a_spec_refuses_an_identifier_weight_outside_zero_to_one() -> None:
    for weight in (-0.1, 1.0):
        with pytest.raises(ValueError, match="identifier_weight"):
            EncoderSpec("bad", "sentence-transformers", "/models/x", identifier_weight=weight)


def write_model_number_benchmark(folder: Path, lefts: int = 40) -> Path:
    """Matches share a model number in other words; each non-match repeats the left record but one digit."""
    folder.mkdir(parents=True, exist_ok=True)
    products = ["dvd player", "ink cartridge", "camcorder", "speaker system", "laser printer"]
    table_a, table_b, pairs = ["id,title"], ["id,title"], []
    for i in range(lefts):
        product, code, neighbour = products[i % len(products)], f"xk{1000 + 7 * i}", f"xk{1001 + 7 * i}"
        table_a.append(f"a{i},acme {product} model {code} black")
        table_b += [f"m{i},{code} {product} from acme", f"n{i},acme {product} model {neighbour} black"]
        pairs += [f"a{i},m{i},1", f"a{i},n{i},0"]
    for name, lines in (("tableA", table_a), ("tableB", table_b)):
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    third = len(pairs) // 3
    for name, chunk in (("train", pairs[:third]), ("valid", pairs[third : 2 * third]), ("test", pairs[2 * third :])):
        (folder / f"{name}.csv").write_text("ltable_id,rtable_id,label\n" + "\n".join(chunk) + "\n")
    return folder


def test_selection_on_valid_gives_identifiers_weight_where_model_numbers_decide(
    pool: EncoderPool, tmp_path: Path
) -> None:
    data = training_data.load([write_model_number_benchmark(tmp_path / "models")], "plain", None)
    selection = select_identifier_weight(pool.spec("minilm"), data, "cpu", [0.3, 0.0, 0.1])

    assert [row["weight"] for row in selection] == [0.0, 0.1, 0.3]
    by_weight = {row["weight"]: row["valid_f1"] for row in selection}
    assert by_weight[0.3] > by_weight[0.0]  # dense cosine alone prefers the near-identical wrong model


def test_average_precision_selection_reports_both_scores_and_serves_the_best_ranking_weight(
    pool: EncoderPool, tmp_path: Path
) -> None:
    data = training_data.load([write_model_number_benchmark(tmp_path / "models")], "plain", None)
    weights = (0.0, 0.1, 0.3)
    selection = select_identifier_weight(pool.spec("minilm"), data, "cpu", weights, "average_precision")
    assert all(set(row) == {"weight", "valid_f1", "valid_average_precision"} for row in selection)
    assert all(0.0 <= row["valid_average_precision"] <= 1.0 for row in selection)

    options = StageOptions(
        batch_size=1, learning_rate=0.0, identifier_weights=weights, selection_metric="average_precision"
    )
    run_stage("identifiers", BaseEncoder(pool.spec("minilm")), data, options, tmp_path / "out", "cpu")

    manifest = read_manifest(tmp_path / "out")
    best = max(selection, key=lambda row: row["valid_average_precision"])  # the smallest weight among equals
    assert manifest["encoder"]["identifier_weight"] == best["weight"]
    assert manifest["valid_f1"] == best["valid_f1"]  # the figure reported stays the F1 of what serves
    assert manifest["stages"][-1]["options"]["selection_metric"] == "average_precision"
    assert manifest["stages"][-1]["valid_average_precision"] == best["valid_average_precision"]


def test_checkpoints_chosen_on_average_precision_keep_the_kept_folders_f1(pool: EncoderPool, tmp_path: Path) -> None:
    data = training_data.load([write_model_number_benchmark(tmp_path / "models")], "plain", None)
    options = StageOptions(batch_size=8, learning_rate=1e-5, max_steps=1, selection_metric="average_precision")
    run_stage("supervised", BaseEncoder(pool.spec("minilm")), data, options, tmp_path / "out", "cpu")

    manifest = read_manifest(tmp_path / "out")
    stage = manifest["stages"][0]
    assert [set(e) for e in stage["evaluations"]] == [{"step", "valid_average_precision"}] * 2
    kept = max(stage["evaluations"], key=lambda e: e["valid_average_precision"])
    assert stage["best_step"] == kept["step"]
    assert stage["valid_average_precision"] == kept["valid_average_precision"]
    served = validate_encoder(spec_from_options("out", tmp_path / "out"), data, "cpu")
    assert manifest["valid_f1"] == pytest.approx(served, abs=1e-4)


def test_the_service_matches_and_blocks_with_identifier_features(client, drain, counting_pool) -> None:
    spec = replace(counting_pool.spec("minilm"), name="minilm-ids", identifier_weight=0.3)
    counting_pool.add(spec)
    assert client.put("/datasets/codes", json={"encoder": "minilm-ids", "serialization": "plain"}).status_code == 201
    left = [("1", {"title": "acme dvd player model xk1007 black"})]
    right = [("m", {"title": "xk1007 dvd player from acme"}), ("n", {"title": "acme dvd player model xk1008 black"})]
    assert client.post("/records", json=records_body("codes", "a", left)).status_code == 202
    assert client.post("/records", json=records_body("codes", "b", right)).status_code == 202
    drain()

    answer = client.get("/candidates", params={"dataset": "codes", "source": "a", "id": "1", "k": 2}).json()
    assert [c["id"] for c in answer["candidates"]] == ["m", "n"]
    texts = [left[0][1]["title"], right[0][1]["title"]]
    dense = counting_pool.encode("minilm", [EncoderInput(None, text) for text in texts])
    expected = 0.7 * float(dense[0] @ dense[1]) + 0.3  # both carry xk1007 and nothing else
    match = client.get(
        "/match", params={"dataset": "codes", "left_source": "a", "left_id": "1", "right_source": "b", "right_id": "m"}
    ).json()
    assert match["score"] == pytest.approx(expected, abs=1e-4)


def test_training_with_an_identifier_weight_selects_checkpoints_on_the_served_cosine(
    pool: EncoderPool, tmp_path: Path
) -> None:
    data = training_data.load([write_model_number_benchmark(tmp_path / "models")], "plain", None)
    options = StageOptions(batch_size=8, learning_rate=1e-5, max_steps=1, train_identifier_weight=0.3)
    run_stage("supervised", BaseEncoder(pool.spec("minilm")), data, options, tmp_path / "out", "cpu")

    manifest = read_manifest(tmp_path / "out")
    stage = manifest["stages"][0]
    served = select_identifier_weight(pool.spec("minilm"), data, "cpu", [0.3])[0]["valid_f1"]
    assert stage["evaluations"][0]["valid_f1"] == pytest.approx(served, abs=1e-4)  # step 0: the base model
    assert stage["options"]["train_identifier_weight"] == 0.3
    assert manifest["encoder"]["identifier_weight"] == 0.3  # the folder serves the cosine it was chosen on


def test_the_identifiers_stage_trains_nothing_and_serves_the_base_with_the_weight_chosen_on_valid(
    tmp_path: Path,
) -> None:
    benchmark = write_model_number_benchmark(tmp_path / "models")
    out = tmp_path / "chosen"
    assert (
        main(
            [
                "train",
                str(benchmark),
                "--base",
                "minilm",
                "--stages",
                "identifiers",
                "--serialization",
                "plain",
                "--identifier-weights",
                "0,0.3",
                "--out",
                str(out),
            ]
        )
        == 0
    )

    manifest = read_manifest(out / "identifiers")
    stage = manifest["stages"][0]
    assert stage["steps"] == 0 and [row["weight"] for row in stage["identifier_weights"]] == [0.0, 0.3]
    assert manifest["encoder"]["identifier_weight"] == 0.3  # dense alone confuses neighbouring model numbers
    assert Path(encoder_options(out / "identifiers")["model"]) == Path(EncoderPool(Settings()).spec("minilm").model)

    report_dir = tmp_path / "report"
    assert main(["evaluate", str(benchmark), "--encoder", str(out / "identifiers"), "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["identifier_weight"] == 0.3 and report["valid"]["f1"] == pytest.approx(stage["valid_f1"], abs=1e-3)
