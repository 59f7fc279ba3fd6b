"""Input files of the encode job, read as a stream: .jsonl (one JSON object a line), .txt (a text a line), .parquet.

A row is a line (.txt, .jsonl; a last line without a newline counts, the newline ending the file does not
start another row) or a record (.parquet), numbered from 0. Reading is split in two so a job can skip rows
cheaply: ``iter_raw`` yields each row's raw value (bytes of a line, or a parquet cell) and ``decode`` turns one
into a text or a reason it is unusable. Memory stays constant in the number of rows.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

FORMATS = {".jsonl": "jsonl", ".txt": "txt", ".parquet": "parquet"}
_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class InputInfo:
    """What the job knows about its input before it reads a row."""

    path: str  # absolute
    format: str  # "jsonl", "txt" or "parquet"
    field: str | None  # the text field (jsonl, parquet)
    rows: int
    sha256: str  # of the file's bytes
    size: int  # bytes


@dataclass(frozen=True)
class BadRow:
    """A row that yields no text: ``reason`` is a short code (the manifest counts by it), ``detail`` says more."""

    row: int
    reason: str  # "empty", "invalid_utf8", "invalid_json", "not_an_object", "missing_field", "not_a_string"
    detail: str


def input_format(path: str, fmt: str | None = None) -> str:
    """The input's format: ``fmt`` when given, else from the file's extension."""
    if fmt is not None:
        if fmt not in FORMATS.values():
            raise ValueError(f"format: expected one of {sorted(FORMATS.values())}, got {fmt!r}")
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"input: cannot tell the format of {path!r} from its extension; expected one of "
                         f"{sorted(FORMATS)} (or give the format)")
    return FORMATS[ext]


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ValueError("input: reading .parquet needs pyarrow, which is not installed (pip install pyarrow)") from err
    return pq


def scan(path: str, fmt: str | None = None, field: str | None = "text") -> InputInfo:
    """One pass over the file's bytes: checksum and row count (parquet: from its metadata, field checked)."""
    if not os.path.isfile(path):
        raise ValueError(f"input: {path!r} is not a file")
    fmt = input_format(path, fmt)
    if fmt in ("jsonl", "parquet") and not field:
        raise ValueError(f"field: a {fmt} input needs the name of its text field")
    digest, size, newlines, last = hashlib.sha256(), 0, 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            digest.update(block)
            size += len(block)
            newlines += block.count(b"\n")
            last = block[-1:]
    if fmt == "parquet":
        meta = _pyarrow_parquet().ParquetFile(path)
        if field not in meta.schema_arrow.names:
            raise ValueError(f"field: {path!r} has no column {field!r} (columns: {meta.schema_arrow.names})")
        rows = meta.metadata.num_rows
    else:
        rows = newlines + (last != b"\n")
    return InputInfo(os.path.abspath(path), fmt, field if fmt != "txt" else None, rows, digest.hexdigest(), size)


def iter_raw(info: InputInfo) -> Iterator[Any]:
    """Each row's raw value in order: a line's bytes without its line ending, or a parquet cell."""
    if info.format == "parquet":
        parquet = _pyarrow_parquet().ParquetFile(info.path)
        for batch in parquet.iter_batches(batch_size=4096, columns=[info.field]):
            yield from batch.column(0).to_pylist()
        return
    with open(info.path, "rb") as f:
        for line in f:
            yield line.rstrip(b"\n").rstrip(b"\r")


def decode(info: InputInfo, row: int, raw: Any) -> str | BadRow:
    """A raw value -> its text, or a ``BadRow`` saying why there is none."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return BadRow(row, "invalid_utf8", f"invalid UTF-8 at byte {err.start}")
        if info.format == "jsonl":
            if not raw.strip():
                return BadRow(row, "empty", "empty line")
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as err:
                return BadRow(row, "invalid_json", f"invalid JSON: {err.msg} at column {err.colno}")
            if not isinstance(raw, dict):
                return BadRow(row, "not_an_object", f"a JSON {type(raw).__name__}, not an object")
            if info.field not in raw:
                return BadRow(row, "missing_field", f"no field {info.field!r}")
            raw = raw[info.field]
    if raw is None:
        return BadRow(row, "missing_field", f"{info.field!r} is null")
    if not isinstance(raw, str):
        return BadRow(row, "not_a_string", f"{info.field!r} is a {type(raw).__name__}, not a string")
    if not raw.strip():
        return BadRow(row, "empty", "empty text")
    return raw
