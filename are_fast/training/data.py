"""Training data: JSON-lines rows read, checked and tokenized into model items.

Stage-1 rows {context, instruction, output}, stage-2 rows {query, pos, neg, instruction}, named by ``id`` (else
the line number). Bad rows are skipped and counted per reason with line numbers (``DataReport``), never a
crash; ``check_usable`` fails a file with too many."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from ..model.objectives import Stage1Item, Stage2Item

STAGE1_FIELDS = ("context", "instruction", "output")
STAGE2_FIELDS = ("query", "pos", "neg", "instruction")


@dataclass
class DataReport:
    """What happened to a file's rows: kept, skipped per reason (with the first few line numbers), truncated."""

    path: str
    kept: int = 0
    sha256: str = ""  # of the file's bytes: the training runs' fingerprints hold it
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> first line numbers
    truncated: Counter = field(default_factory=Counter)  # text kind -> rows cut to the maximum length

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(line)

    def summary(self) -> str:
        parts = [f"{self.path}: {self.kept} rows kept"]
        for reason, count in self.skipped.items():
            parts.append(f"{count} skipped ({reason}; lines {', '.join(map(str, self.examples[reason]))}...)")
        for kind, count in self.truncated.items():
            if count:
                parts.append(f"{count} {kind} truncated to the maximum length")
        return "; ".join(parts)


    @property
    def bad_fraction(self) -> float:
        total = self.kept + sum(self.skipped.values())
        return sum(self.skipped.values()) / total if total else 0.0


DEFAULT_MAX_BAD_FRACTION = 0.5


def check_usable(rows: list, report: DataReport, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 what: str = "") -> None:
    """ValueError when no row is usable or more than ``max_bad_fraction`` of the rows were skipped."""
    if not rows:
        raise ValueError(f"data: no usable {what}row in {report.path!r} ({report.summary()})")
    if report.bad_fraction > max_bad_fraction:
        raise ValueError(f"data: {report.bad_fraction:.0%} of the rows of {report.path!r} are bad, more than "
                         f"--max-bad-fraction {max_bad_fraction:g} (wrong file or format?): {report.summary()}")


def read_jsonl(path: str, report: DataReport):
    """Yield (1-based line number, dict) per line holding a JSON object; empty lines and lines with invalid UTF-8
    or JSON, or not an object, are counted in ``report`` and skipped. The file's sha256 lands in ``report.sha256``
    once it is read."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise ValueError(f"data file {path!r} cannot be read: {err.strerror or err}") from None
    digest = hashlib.sha256()
    with handle:
        for number, raw in enumerate(handle, 1):
            digest.update(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                report.skip("invalid UTF-8", number)
                continue
            if not line.strip():  # counted like any bad row (the encode job does the same)
                report.skip("empty line", number)
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                report.skip("invalid JSON", number)
                continue
            if not isinstance(row, dict):
                report.skip("not a JSON object", number)
                continue
            yield number, row
    report.sha256 = digest.hexdigest()


def _text(row: dict, name: str) -> str | None:
    value = row.get(name)
    return value if isinstance(value, str) and value.strip() else None


def _row_id(row: dict, number: int, seen: set, report: DataReport) -> str | None:
    row_id = str(row["id"]) if "id" in row else f"line{number}"
    if row_id in seen:
        report.skip("duplicate id", number)
        return None
    seen.add(row_id)
    return row_id


def load_stage1(path: str, instruction: str | None = None) -> tuple[list[dict], DataReport]:
    """Valid stage-1 rows as dicts with id, context, instruction, output. ``instruction`` fills rows without one."""
    report, rows, seen = DataReport(path), [], set()
    for number, row in read_jsonl(path, report):
        values = {name: _text(row, name) for name in STAGE1_FIELDS}
        if values["instruction"] is None and instruction is not None:
            values["instruction"] = instruction
        bad = [name for name, value in values.items() if value is None]
        if bad:
            report.skip(f"missing or empty {'/'.join(bad)}", number)
            continue
        row_id = _row_id(row, number, seen, report)
        if row_id is not None:
            rows.append({"id": row_id, **values})
    report.kept = len(rows)
    return rows, report


def load_stage2(path: str, num_negatives: int, instruction: str | None = None) -> tuple[list[dict], DataReport]:
    """Valid stage-2 rows as dicts with id, query, pos, neg (a list of exactly ``num_negatives``), instruction.

    A list-valued pos keeps its first entry (as released); longer negative lists keep their first
    ``num_negatives``; rows with fewer are skipped and counted, never padded with another row's texts.
    """
    if num_negatives < 1:
        raise ValueError(f"num_negatives: expected at least 1, got {num_negatives}")
    report, rows, seen = DataReport(path), [], set()
    for number, row in read_jsonl(path, report):
        pos = row.get("pos")
        if isinstance(pos, list):
            row = {**row, "pos": pos[0] if pos else None}
        neg = row.get("neg")
        negs = [neg] if isinstance(neg, str) else neg if isinstance(neg, list) else []
        values = {name: _text(row, name) for name in ("query", "pos", "instruction")}
        if values["instruction"] is None and instruction is not None:
            values["instruction"] = instruction
        bad = [name for name, value in values.items() if value is None]
        if any(not (isinstance(n, str) and n.strip()) for n in negs) or not negs:
            bad.append("neg")
        if bad:
            report.skip(f"missing or empty {'/'.join(bad)}", number)
            continue
        if len(negs) < num_negatives:
            report.skip(f"fewer than {num_negatives} negatives", number)
            continue
        row_id = _row_id(row, number, seen, report)
        if row_id is not None:
            rows.append({"id": row_id, **values, "neg": negs[:num_negatives]})
    report.kept = len(rows)
    return rows, report


def fingerprint(row: dict) -> int:
    """A 63-bit hash of a stage-2 row's texts: the reference-score file checks rows against it."""
    text = json.dumps([row["query"], row["pos"], row["neg"], row["instruction"]], ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def stage1_items(rows, compressor, decoder, report: DataReport | None = None) -> list[Stage1Item]:
    """Tokenize stage-1 rows; truncations are counted in ``report``."""
    prefixes = compressor.tokenize([r["context"] for r in rows], [r["instruction"] for r in rows])
    targets = decoder.tokenize([r["output"] for r in rows])
    if report is not None:
        report.truncated["contexts"] += prefixes.truncated
        report.truncated["outputs"] += targets.truncated
    return [Stage1Item(p, t) for p, t in zip(prefixes.ids, targets.ids)]


def stage2_items(rows, compressor, decoder, report: DataReport | None = None, scores=None) -> list[Stage2Item]:
    """Tokenize stage-2 rows; ``scores`` maps row id -> (ref_p, ref_n list) (see training.refscores)."""
    instructions = [r["instruction"] for r in rows]
    queries = compressor.tokenize([r["query"] for r in rows], instructions)
    pos_prefix = compressor.tokenize([r["pos"] for r in rows], instructions)
    pos_target = decoder.tokenize([r["pos"] for r in rows])
    n = len(rows[0]["neg"]) if rows else 0
    negs = decoder.tokenize([neg for r in rows for neg in r["neg"]])
    if report is not None:
        report.truncated["queries"] += queries.truncated
        report.truncated["positives"] += pos_prefix.truncated
        report.truncated["negatives"] += negs.truncated
    items = []
    for i, row in enumerate(rows):
        ref_p, ref_n = scores[row["id"]] if scores is not None else (None, None)
        items.append(Stage2Item(row["id"], queries.ids[i], pos_prefix.ids[i], pos_target.ids[i],
                                negs.ids[i * n: (i + 1) * n], ref_p, ref_n))
    return items
