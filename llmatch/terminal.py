"""Terminal commands over the HTTP API: ``llmatch label`` (the review queue) and ``llmatch entities`` (export)."""

from __future__ import annotations

import csv
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

Ask = Callable[[str], str]
Say = Callable[[str], None]
ANSWERS = {"y": 1, "yes": 1, "n": 0, "no": 0, "s": None, "skip": None}
MAX_VALUE_LINES = 3  # lines an attribute's value takes at most in ``show_pair``


class ApiCallError(RuntimeError):
    pass


def api_client(url: str, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, timeout=300, headers=headers)


def call(client: httpx.Client, method: str, path: str, expected: int = 200, **kwargs: Any) -> Any:
    """One request; the contract's ``detail`` as an error when the answer is not ``expected``."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as error:
        raise ApiCallError(
            f"cannot reach the API at {client.base_url} ({error}); is `llmatch serve` running?"
        ) from error
    if response.status_code != expected:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:200]
        raise ApiCallError(f"{method} {path} answered {response.status_code}: {detail}")
    return response.json() if response.content else None


@dataclass
class LabelSummary:
    """What a labelling session stored."""

    matches: int = 0
    non_matches: int = 0
    skipped: int = 0

    @property
    def labelled(self) -> int:
        return self.matches + self.non_matches

    def __str__(self) -> str:
        counts = f"{self.matches} matches, {self.non_matches} non-matches, {self.skipped} skipped"
        return f"{self.labelled} labelled: {counts}"


def label_queue(
    client: httpx.Client, dataset: str, ask: Ask = input, say: Say = print, batch: int = 10, explain: bool = True
) -> int:
    """``label_session``; returns how many labels were stored."""
    return label_session(client, dataset, ask, say, batch, explain).labelled


def label_session(
    client: httpx.Client,
    dataset: str,
    ask: Ask = input,
    say: Say = print,
    batch: int = 10,
    explain: bool = True,
    summary: LabelSummary | None = None,
) -> LabelSummary:
    """Show the pairs of /review one by one (a page of ``batch`` at a time), store each y/n answer as a label at
    once (s skips, q quits), and after each page offer to recalibrate on the stored labels; ends when /review has
    no pair left or on q (or the end of the input). Counts into ``summary`` as it goes (kept on Ctrl-C)."""
    summary = summary if summary is not None else LabelSummary()
    skipped: set[tuple[str, str, str, str]] = set()
    while True:
        page = call(client, "GET", f"/datasets/{dataset}/review", params={"limit": min(batch + len(skipped), 5000)})
        pairs = [p for p in page["pairs"] if _key(p) not in skipped][:batch]
        if not pairs:
            say("No unlabelled candidate pairs left to review.")
            return summary
        labelled_now, quit_now = 0, False
        for number, pair in enumerate(pairs, start=1):
            say(show_pair(pair, _explanation(client, dataset, pair) if explain else None, number, len(pairs)))
            answer = _answer(ask)
            if answer == "q":
                quit_now = True
                break
            if answer is None:
                skipped.add(_key(pair))
                summary.skipped += 1
                continue
            body = {"pairs": [{**_sides(pair), "label": answer}]}
            total = call(client, "PUT", f"/datasets/{dataset}/labels", json=body)["total"]
            if answer:
                summary.matches += 1
            else:
                summary.non_matches += 1
            labelled_now += 1
            say(f"stored ({total} labels in {dataset})")
        if labelled_now and _yes(ask, "Recalibrate on the stored labels? [Y/n] "):
            say(recalibrate(client, dataset))
        if quit_now:
            return summary


def recalibrate(client: httpx.Client, dataset: str) -> str:
    try:
        result = call(client, "POST", f"/datasets/{dataset}/calibrate", json={"from": "labels"})
    except ApiCallError as error:
        return f"not recalibrated: {error}"
    return (
        f"threshold {result['threshold']:.4f} on {result['pairs']} labels ({result['positives']} matches): "
        f"precision {result['precision']:.3f}, recall {result['recall']:.3f}, F1 {result['f1']:.3f}"
    )


def show_pair(pair: dict, explanation: dict | None, number: int, count: int) -> str:
    """Both records side by side, one attribute a row, with each attribute's similarity when explained."""
    width = max(60, min(shutil.get_terminal_size((120, 20)).columns, 160))
    column = (width - 26) // 2
    left, right = pair["left"], pair["right"]
    similarity = {a["name"]: a["similarity"] for a in (explanation or {}).get("attributes", [])}
    names = list(dict.fromkeys([*left["attributes"], *right["attributes"]]))
    probability = "" if pair.get("probability") is None else f", probability {pair['probability']:.2f}"
    lines = [
        "",
        f"[{number}/{count}] score {pair['score']:.4f}{probability}",
        _row("", f"{left['source']}/{left['id']}", f"{right['source']}/{right['id']}", column),
    ]
    for name in names:
        a = _cut(_text(left["attributes"].get(name)), column)
        b = _cut(_text(right["attributes"].get(name)), column)
        sim = similarity.get(name)
        for i in range(max(len(a), len(b))):
            label = name[:12] if i == 0 else ""
            tail = f"  {sim:.2f}" if i == 0 and sim is not None else ""
            lines.append(_row(label, a[i] if i < len(a) else "", b[i] if i < len(b) else "", column) + tail)
    if explanation:
        ids = explanation["identifiers"]
        lines.append(
            f"codes: shared {', '.join(ids['shared']) or '-'}; left only {', '.join(ids['left_only']) or '-'};"
            f" right only {', '.join(ids['right_only']) or '-'}"
        )
    return "\n".join(lines)


def export_entities(client: httpx.Client, dataset: str, out: Path, min_size: int = 1) -> int:
    """Write ``source,id,entity`` for every record of an entity of at least ``min_size`` records; returns rows."""
    rows, offset = 0, 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["source", "id", "entity"])
        while True:
            params = {"min_size": min_size, "limit": 1000, "offset": offset}
            page = call(client, "GET", f"/datasets/{dataset}/entities", params=params)
            for entity in page["entities"]:
                for record in entity["records"]:
                    writer.writerow([record["source"], record["id"], entity["id"]])
                    rows += 1
            offset += len(page["entities"])
            if not page["entities"] or offset >= page["total"]:
                return rows


def _explanation(client: httpx.Client, dataset: str, pair: dict) -> dict | None:
    params = {
        "dataset": dataset,
        "left_source": pair["left"]["source"],
        "left_id": pair["left"]["id"],
        "right_source": pair["right"]["source"],
        "right_id": pair["right"]["id"],
        "explain": "true",
    }
    try:
        return call(client, "GET", "/match", params=params).get("explanation")
    except ApiCallError:
        return None  # the pair is still worth labelling without its explanation


def _answer(ask: Ask) -> int | str | None:
    while True:
        try:
            text = ask("Same thing? [y]es / [n]o / [s]kip / [q]uit: ").strip().lower()
        except EOFError:
            return "q"
        if text in ("q", "quit"):
            return "q"
        if text in ANSWERS:
            return ANSWERS[text]


def _yes(ask: Ask, question: str) -> bool:
    try:
        return ask(question).strip().lower() in ("", "y", "yes")
    except EOFError:
        return False


def _key(pair: dict) -> tuple[str, str, str, str]:
    return (pair["left"]["source"], pair["left"]["id"], pair["right"]["source"], pair["right"]["id"])


def _sides(pair: dict) -> dict[str, str]:
    left, right = pair["left"], pair["right"]
    return {
        "left_source": left["source"],
        "left_id": left["id"],
        "right_source": right["source"],
        "right_id": right["id"],
    }


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _cut(text: str, width: int, lines: int = MAX_VALUE_LINES) -> list[str]:
    """A value wrapped to ``width`` columns, at most ``lines`` of them (the last ends with '…' when cut)."""
    flat = " ".join(text.split())
    room = width * lines * 2
    wrapped = textwrap.wrap(flat[:room], width) or [""]
    if len(wrapped) > lines or len(flat) > room:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: width - 1] + "…"
    return wrapped


def _row(label: str, left: str, right: str, width: int) -> str:
    return f"{label:14}{left[:width].ljust(width)}  {right[:width].ljust(width)}"
