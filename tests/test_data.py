"""Data loading: bad rows are skipped and counted per reason, never misaligned; truncations are counted."""
import json

import pytest

from are_fast.training.data import fingerprint, load_stage1, load_stage2


def _write(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return str(path)


def test_stage2_rows_are_validated_and_counted(tmp_path):
    path = _write(tmp_path / "s2.jsonl", [
        {"query": "q1", "pos": "p1", "neg": ["n1", "n2", "n3"], "instruction": "i"},  # kept, cut to 2 negatives
        {"query": "q2", "pos": ["p2", "other"], "neg": ["n1", "n2"]},  # no instruction: filled by default; pos[0]
        {"query": "", "pos": "p", "neg": ["n", "m"], "instruction": "i"},  # empty query
        {"pos": "p", "neg": ["n", "m"], "instruction": "i"},  # missing query
        {"query": "q", "pos": "p", "neg": "only one", "instruction": "i"},  # too few negatives
        {"query": "q", "pos": "p", "neg": ["n", ""], "instruction": "i"},  # an empty negative
        "{not json",
        "[1, 2]",
        "",  # a blank line: a bad row like any other (line 9)
        {"id": "x", "query": "q3", "pos": "p3", "neg": ["a", "b"], "instruction": "i"},
        {"id": "x", "query": "q4", "pos": "p4", "neg": ["a", "b"], "instruction": "i"},  # duplicate id
    ])
    rows, report = load_stage2(path, num_negatives=2, instruction="default")
    assert [r["id"] for r in rows] == ["line1", "line2", "x"]
    assert rows[0]["neg"] == ["n1", "n2"] and rows[1]["pos"] == "p2" and rows[1]["instruction"] == "default"
    assert report.kept == 3
    assert report.skipped == {"missing or empty query": 2, "fewer than 2 negatives": 1, "missing or empty neg": 1,
                              "invalid JSON": 1, "not a JSON object": 1, "empty line": 1, "duplicate id": 1}
    assert report.examples["empty line"] == [9]
    assert report.examples["missing or empty query"] == [3, 4]
    text = report.summary()
    assert "3 rows kept" in text and "2 skipped (missing or empty query; lines 3, 4" in text


def test_stage1_rows_and_instruction_default(tmp_path):
    path = _write(tmp_path / "s1.jsonl", [{"context": "c", "output": "o"}, {"context": "c", "output": " "}])
    rows, report = load_stage1(path)
    assert rows == [] and report.skipped == {"missing or empty instruction": 1, "missing or empty instruction/output": 1}
    rows, report = load_stage1(path, instruction="restate")
    assert [r["instruction"] for r in rows] == ["restate"] and report.skipped == {"missing or empty output": 1}


def test_unreadable_files_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot be read"):
        load_stage1(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "latin1.jsonl"
    good = b'{"context": "c", "instruction": "i", "output": "o"}\n'
    bad.write_bytes(good + b'{"context": "caf\xe9"}\n' + good.replace(b'"c"', b'"d"'))
    rows, report = load_stage1(str(bad))  # one bad line is skipped with its 1-based number, the file still loads
    assert len(rows) == 2 and report.skipped == {"invalid UTF-8": 1} and report.examples["invalid UTF-8"] == [2]
    assert "1 skipped (invalid UTF-8; lines 2...)" in report.summary()
    with pytest.raises(ValueError, match="num_negatives"):
        load_stage2(str(bad), num_negatives=0)


def test_truncation_is_counted(tmp_path):
    from are_fast.training.data import stage1_items
    from are_fast.model import Compressor, FrozenDecoder
    from are_fast.toy.data import tiny_llama

    tiny_llama(str(tmp_path / "m"), hidden_size=16, layers=1)
    comp = Compressor.from_pretrained(str(tmp_path / "m"), 2, max_text_tokens=10)
    dec = FrozenDecoder.from_pretrained(str(tmp_path / "m"), max_target_tokens=4)
    path = _write(tmp_path / "s1.jsonl", [{"context": "x" * 20, "instruction": "i", "output": "abcdef"},
                                          {"context": "short", "instruction": "i", "output": "ab"}])
    rows, report = load_stage1(path)
    items = stage1_items(rows, comp, dec, report)
    assert report.truncated == {"contexts": 1, "outputs": 1}
    assert len(items[0].target) == 5 and items[0].target[-1] == dec.tokenizer.eos_token_id  # 4 tokens + eos
    assert "1 contexts truncated" in report.summary()


def test_fingerprint_sees_every_text():
    row = {"query": "q", "pos": "p", "neg": ["a", "b"], "instruction": "i"}
    prints = {fingerprint(row)} | {fingerprint({**row, k: v}) for k, v in
                                   (("query", "Q"), ("pos", "P"), ("neg", ["b", "a"]), ("instruction", "I"))}
    assert len(prints) == 5 and all(0 <= p < 2**63 for p in prints)
