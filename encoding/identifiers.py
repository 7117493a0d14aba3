"""Identifier features: model and part numbers as an exact, hashed part of a record's vector.

A bi-encoder weighs ``sd-6100`` against ``sd-6110`` like any other token in a record of dozens, yet for
product listings that one token often decides the match. An encoder with ``identifier_weight`` w > 0 appends
a bag of the record's identifier features, hashed into ``identifier_dims`` buckets and L2-normalised, to
its dense vector: ``concat(sqrt(1 - w) * dense, sqrt(w) * codes)``, renormalised. The cosine of two such
vectors is ``(1 - w) * cos(dense) + w * cos(codes)`` when both records carry identifiers, and the dense cosine
alone scaled by ``sqrt(1 - w)`` when one has none: still one cosine between stored vectors, so matching and
blocking keep working from the index.

Identifiers are codes that mix letters and digits (``hdr-sr10``) and runs of four or more digits (catalogue
numbers such as ``86210010``; years too, which the weight chosen on valid data discounts where they mislead).
The features of a code are the token itself and its stem, the token without the letters after its last digit
(``mb111lla`` -> ``mb111``), when the stem is still a code: the same code agrees fully, a variant of it
(``mb111ll``, ``txsr606`` against ``txsr606b``: a region, colour or finish suffix) half, another code
(``sd6110``) not at all. A digit run is its own single feature.

Each of the three rules that extend the plain letter-and-digit codes (digit runs, hyphens dropped, stems) can be
switched off through ``IdentifierRules``, for ablations; every default keeps all three.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from encoding.encoder import Encoder, EncoderInput, l2_normalise

DEFAULT_DIMS = 1024
# At least four characters of letters, digits and hyphens, with a digit and a letter (hdr-sr10, am53bk, 1080p).
# Searched over a whole text this pattern costs quadratic time ("a-" * n: each hyphen starts a scan to the end of
# the run), so ``codes`` finds the same matches run by run in linear time; the pattern itself only checks a stem.
IDENTIFIER = re.compile(r"\b(?=[a-z0-9-]*\d)(?=[a-z0-9-]*[a-z])[a-z0-9][a-z0-9-]{3,}\b")
CODE_RUN = re.compile(r"[a-z0-9-]{4,}")  # maximal runs long enough to hold a code
WORD_CHAR = re.compile(r"\w")  # what ``\b`` counts as a word character (Unicode letters, digits, underscore)
DIGIT_CHAR = re.compile(r"\d")  # what ``\d`` counts as a digit (any Unicode decimal digit)
HYPHEN_THEN_CODE_CHAR = re.compile(r"-[a-z0-9]")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
# Four or more digits standing alone (35113, 86210010; not 12.65, nor the 6100 inside sd-6100 or 4546b001).
DIGIT_RUN = re.compile(r"(?<![\w-])\d{4,}(?![\w-])")
LETTER_SUFFIX = re.compile(r"(?<=\d)[a-z]+$")


@dataclass(frozen=True)
class IdentifierRules:
    """Which rules beyond plain letter-and-digit codes apply (all by default; off only to measure each one)."""

    digit_runs: bool = True  # numbers of four or more digits standing alone are identifiers (35113)
    drop_hyphens: bool = True  # sd-6100 and sd6100 are the same code
    stems: bool = True  # a code's stem is a feature too, so a suffix variant (mb111ll / mb111lla) agrees half


ALL_RULES = IdentifierRules()


def identifier_tokens(text: str, rules: IdentifierRules = ALL_RULES) -> set[str]:
    """The codes (lower-cased, hyphens dropped: ``sd-6100`` and ``sd6100`` agree) and digit runs of a text."""
    lowered = text.lower()
    codes = list(identifier_codes(lowered))
    tokens = {token.replace("-", "") for token in codes} if rules.drop_hyphens else set(codes)
    return tokens | set(DIGIT_RUN.findall(lowered)) if rules.digit_runs else tokens


def identifier_codes(lowered: str) -> Iterator[str]:
    """What ``IDENTIFIER.findall(lowered)`` finds, in linear time: at most one code per run of [a-z0-9-]{4,}."""
    for run in CODE_RUN.finditer(lowered):
        code = _code_in_run(lowered, run.start(), run.end())
        if code is not None:
            yield code


def _code_in_run(text: str, start: int, end: int) -> str | None:
    """The pattern's match inside the maximal run ``text[start:end]``, or None.

    The pattern may start where ``\\b`` holds before a letter or digit: at the run's start (unless a word
    character outside the run precedes it) or after a hyphen inside it. Its lookaheads ask for a letter and a
    digit at or after the start within the run (or a non-ASCII digit right after the run, which ``\\d`` also
    reads), and the greedy body ends at the run's last word boundary: every condition holds for the earliest
    start if for any, and a match ends at that last boundary, so one run holds at most one match.
    """
    run = text[start:end]
    first = _first_start(text, start, end)
    last = _last_boundary(text, start, end)
    if first is None or last is None or first + 4 > last:
        return None
    offset = first - start
    letter = len(run.rstrip(DIGITS + "-")) - 1  # index of the run's last letter, -1 if none
    digit = len(run.rstrip(LETTERS + "-")) - 1
    digit_after = end < len(text) and DIGIT_CHAR.match(text, end) is not None
    if letter < offset or (digit < offset and not digit_after):
        return None
    return text[first:last]


def _first_start(text: str, start: int, end: int) -> int | None:
    """The earliest position in the run where ``\\b`` holds before a letter or digit."""
    if text[start] != "-" and (start == 0 or WORD_CHAR.match(text, start - 1) is None):
        return start
    after_hyphen = HYPHEN_THEN_CODE_CHAR.search(text, start, end)
    return after_hyphen.start() + 1 if after_hyphen else None


def _last_boundary(text: str, start: int, end: int) -> int | None:
    """The last position after the run's start where ``\\b`` holds (inside a run: between a hyphen and a
    letter or digit; at its end: against the character that follows, or the end of the text)."""
    run = text[start:end]
    follows_word = end < len(text) and WORD_CHAR.match(text, end) is not None
    if (run[-1] != "-") != follows_word:
        return end
    if run[-1] == "-":  # a hyphen run at the end, followed by no word character: boundary before the hyphens
        trimmed = len(run.rstrip("-"))
        return start + trimmed if trimmed else None
    hyphen = run.rfind("-")  # a letter or digit followed by a word character: boundary after the last hyphen
    return start + hyphen + 1 if hyphen >= 0 else None


def identifier_features(text: str, rules: IdentifierRules = ALL_RULES) -> set[str]:
    """Each identifier token, and its stem (``stem:mb111`` for ``mb111lla``) where that is an identifier too."""
    features = set()
    for token in identifier_tokens(text, rules):
        features.add(token)
        stem = LETTER_SUFFIX.sub("", token)
        if rules.stems and IDENTIFIER.fullmatch(stem):
            features.add(f"stem:{stem}")
    return features


def identifier_vectors(
    texts: Iterable[str], dims: int = DEFAULT_DIMS, rules: IdentifierRules = ALL_RULES
) -> np.ndarray:
    """One unit row per text: its identifier features hashed into ``dims`` buckets; a text without any: zeros."""
    rows = []
    for text in texts:
        row = np.zeros(dims, dtype=np.float32)
        for feature in identifier_features(text, rules):
            row[_bucket(feature, dims)] += 1.0
        rows.append(row)
    return l2_normalise(np.stack(rows)) if rows else np.zeros((0, dims), dtype=np.float32)


def _bucket(token: str, dims: int) -> int:
    """A stable hash (the same in every process and on every machine, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little") % dims


def combine(dense: np.ndarray, identifiers: np.ndarray, weight: float) -> np.ndarray:
    """Unit rows ``concat(sqrt(1 - weight) * dense, sqrt(weight) * identifiers)``; both inputs are unit rows."""
    return l2_normalise(np.hstack([math.sqrt(1.0 - weight) * dense, math.sqrt(weight) * identifiers]))


class IdentifierEncoder:
    """Wraps an encoder: its dense vectors with the identifier features of the same text appended."""

    def __init__(self, inner: Encoder, key: str, weight: float, dims: int = DEFAULT_DIMS):
        if not 0.0 < weight < 1.0:
            raise ValueError(f"identifier_weight must lie between 0 and 1 (exclusive); got {weight}")
        self.inner = inner
        self.key = key
        self.weight = weight
        self.dims = dims
        self.dim = inner.dim + dims

    def encode(self, inputs: Sequence[EncoderInput], batch_size: int = 32) -> np.ndarray:
        dense = self.inner.encode(inputs, batch_size=batch_size)
        return combine(dense, identifier_vectors((item.text for item in inputs), self.dims), self.weight)
