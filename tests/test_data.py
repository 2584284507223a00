"""Tests of lrcomp.data: every source format, determinism, filtering and the errors on bad input."""

from __future__ import annotations

import json
import os
import sys

import pytest

from lrcomp import data
from lrcomp.data import load_labeled_texts, load_texts, parse_fortune_file

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with one step.",
             "Premature optimization is the root of all evil.", "Short", "Time flies like an arrow; fruit flies too."]


@pytest.fixture
def fortune_dir(tmp_path):
    """Two categories in fortune format, an index file, a symlink duplicate and a hidden file."""
    root = tmp_path / "fortunes"
    root.mkdir()
    (root / "wisdom").write_text("Know thyself, said the oracle.\n%\n\tLook before\n\tyou leap,  friend.\n%\n"
                                 "tiny\n%\n")
    (root / "computers").write_text("There are 10 kinds of people in the world.\n%\n"
                                    "It works on my machine, said everyone.\n")
    (root / "wisdom.dat").write_bytes(b"\x00\x02binary index")
    (root / ".hidden").write_text("Never read: hidden files are skipped.\n")
    os.symlink(root / "wisdom", root / "wisdom.u8")
    return root


def test_fortune_dir_records_labels_and_order(fortune_dir):
    texts, labels, names = load_labeled_texts(fortune_dir, min_chars=10)
    assert names == ["computers", "wisdom"]  # .dat, hidden and the symlink duplicate are not categories
    assert texts == ["There are 10 kinds of people in the world.", "It works on my machine, said everyone.",
                     "Know thyself, said the oracle.", "Look before you leap, friend."]  # whitespace collapsed
    assert labels == [0, 0, 1, 1]
    assert load_texts(fortune_dir, min_chars=10) == texts


def test_fortune_min_chars_drops_short_records(fortune_dir):
    assert "tiny" in load_texts(fortune_dir, min_chars=1)
    assert "tiny" not in load_texts(fortune_dir, min_chars=5)


def test_parse_fortune_file_without_trailing_separator(tmp_path):
    path = tmp_path / "f"
    path.write_text("first one\n%\nsecond\nline\n")
    assert parse_fortune_file(path) == ["first one", "second\nline"]


def test_latin1_file_is_decoded(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "cafe").write_bytes("Un caf\u00e9 cr\u00e8me, s'il vous pla\u00eet.\n".encode("latin-1"))
    assert load_texts(root) == ["Un caf\u00e9 cr\u00e8me, s'il vous pla\u00eet."]


def test_txt_one_text_per_line(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("\n".join(SENTENCES[:3]) + "\n\n   \n")
    assert load_texts(path) == SENTENCES[:3]
    assert load_texts(str(path), limit=2) == SENTENCES[:2]


def test_txt_has_no_labels(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(SENTENCES[0] + "\n")
    with pytest.raises(ValueError, match="no labels"):
        load_labeled_texts(path)


def test_csv_default_and_custom_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"Hello, world, with a comma inside.",greeting\n'
                    f"{SENTENCES[0]},animal\n{SENTENCES[1]},greeting\n")
    texts, labels, names = load_labeled_texts(path)
    assert texts == ["Hello, world, with a comma inside.", SENTENCES[0], SENTENCES[1]]
    assert names == ["animal", "greeting"]
    assert labels == [1, 0, 1]

    other = tmp_path / "e.csv"
    other.write_text(f"sentence,y\n{SENTENCES[2]},10\n{SENTENCES[4]},2\n")
    texts, labels, names = load_labeled_texts(other, text_column="sentence", label_column="y")
    assert names == ["2", "10"]  # integer-like labels sort numerically
    assert labels == [1, 0]
    assert load_texts(other, text_column="sentence") == [SENTENCES[2], SENTENCES[4]]


def test_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text(f"text\tlabel\n{SENTENCES[0]}\ta\n")
    assert load_labeled_texts(path) == ([SENTENCES[0]], [0], ["a"])


def test_csv_missing_column_names_it(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(f"body,label\n{SENTENCES[0]},a\n")
    with pytest.raises(ValueError, match="text_column='text'.*columns: \\['body', 'label'\\]"):
        load_texts(path)
    with pytest.raises(ValueError, match="label_column='category'"):
        load_labeled_texts(path, text_column="body", label_column="category")


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": SENTENCES[0], "label": 1}, {"text": SENTENCES[1], "label": 0}, {"text": SENTENCES[2], "label": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    texts, labels, names = load_labeled_texts(path)
    assert texts == SENTENCES[:3]
    assert names == ["0", "1"]
    assert labels == [1, 0, 1]


def test_jsonl_bad_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": SENTENCES[0]}) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_texts(path)
    path.write_text(json.dumps({"body": SENTENCES[0]}) + "\n")
    with pytest.raises(ValueError, match="text_column='text'"):
        load_texts(path)
    path.write_text(json.dumps({"text": SENTENCES[0]}) + "\n")
    with pytest.raises(ValueError, match="label_column='label'"):
        load_labeled_texts(path)


def test_seeded_sample_is_deterministic_and_a_subset(tmp_path):
    path = tmp_path / "many.txt"
    lines = [f"sentence number {i:03d} of the test corpus" for i in range(200)]
    path.write_text("\n".join(lines))
    a = load_texts(path, limit=20, seed=1)
    assert a == load_texts(path, limit=20, seed=1)
    assert a != load_texts(path, limit=20, seed=2)
    assert a != lines[:20] and set(a) <= set(lines) and len(set(a)) == 20


def test_length_filters(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("\n".join(SENTENCES))
    assert "Short" not in load_texts(path)  # default min_chars=20
    assert load_texts(path, min_chars=0, max_chars=5) == ["Short"]


@pytest.mark.parametrize("kwargs, match", [
    ({"limit": 0}, "limit must be a positive int"),
    ({"limit": 2.5}, "limit must be a positive int"),
    ({"min_chars": -1}, "min_chars must be"),
    ({"min_chars": 30, "max_chars": 10}, "max_chars must be"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    path = tmp_path / "s.txt"
    path.write_text(SENTENCES[0])
    with pytest.raises(ValueError, match=match):
        load_texts(path, **kwargs)


def test_missing_empty_and_unknown_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="source=.*does not exist"):
        load_texts(tmp_path / "absent.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(str(tmp_path / "absent"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="source: .*empty.txt.* has no text"):
        load_texts(empty)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="holds no fortune-format files"):
        load_texts(empty_dir)
    odd = tmp_path / "d.parquet"
    odd.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="unknown file type '.parquet'"):
        load_texts(odd)
    with pytest.raises(TypeError, match="source must be"):
        load_texts(42)


def test_fortunes_missing_message(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FORTUNES_DIR", tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError, match="fortunes not found.*apt-get install fortunes.*source="):
        load_texts()


def test_dataset_name_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="source='someone/some_dataset'.*pip install datasets"):
        load_texts("someone/some_dataset")


@pytest.mark.skipif(not data.FORTUNES_DIR.is_dir(), reason="Debian package fortunes not installed "
                    "(apt-get install fortunes)")
def test_real_fortunes():
    texts, labels, names = load_labeled_texts()
    assert len(names) >= 30 and "computers" in names and not any(n.endswith((".dat", ".u8")) for n in names)
    assert len(texts) == len(labels) > 5000
    assert all(0 <= label < len(names) for label in labels) and len(set(labels)) >= 30
    assert all(20 <= len(t) <= 1000 and "\n" not in t for t in texts)
    sample = load_texts(limit=50, seed=0)
    assert sample == load_texts(limit=50, seed=0) and len(sample) == 50
