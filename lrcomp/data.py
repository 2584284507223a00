"""Real text for calibration, evaluation and benchmarks, from local files (no network).

Sources understood by :func:`load_texts` and :func:`load_labeled_texts`:

- ``None``: the Debian ``fortunes`` package (``/usr/share/games/fortunes``): about 40
  categories of quotations, the category being the file name;
- a directory of fortune-format files: records separated by lines holding only ``%``
  (``*.dat`` index files, hidden files and symlinks to files already read are skipped);
- a ``.txt`` file: one text per non-blank line (no labels);
- a ``.csv`` / ``.tsv`` file with a header: columns ``text`` and ``label`` (names configurable);
- a ``.jsonl`` file: one JSON object per line with keys ``text`` and ``label`` (configurable);
- any other string: a Hugging Face dataset name loaded with ``datasets.load_dataset``
  (needs the optional ``datasets`` package and the dataset in the local cache when offline).

The order is deterministic: files in sorted name order, records in file order; ``seed``
draws a reproducible shuffle before ``limit`` is applied.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")

_Record = tuple[str, "str | None"]


def _decode(raw: bytes) -> str:
    # Most fortune files are UTF-8, a few old ones Latin-1; Latin-1 decodes any byte string.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _clean(text: str, normalize_whitespace: bool) -> str:
    return " ".join(text.split()) if normalize_whitespace else text.strip()


def parse_fortune_file(path: str | os.PathLike) -> list[str]:
    """The records of one fortune-format file (separated by lines holding only ``%``), raw."""
    text = _decode(Path(path).read_bytes())
    records, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            records.append("\n".join(current))
            current = []
        else:
            current.append(line)
    records.append("\n".join(current))
    return [r for r in records if r.strip()]


def _fortune_files(directory: Path) -> list[tuple[str, Path]]:
    """(category, file) pairs in sorted order, each real file once (regular files before symlinks)."""
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    candidates = [p for p in entries if p.suffix != ".dat" and p.is_file()]
    seen: set[Path] = set()
    out = []
    # Regular files first, so that a symlink such as ``art.u8 -> art`` never names the category.
    for path in sorted(candidates, key=lambda p: (p.is_symlink(), p.name)):
        real = path.resolve()
        if real in seen:
            continue
        seen.add(real)
        name = path.name[: -len(".u8")] if path.name.endswith(".u8") else path.name
        out.append((name, path))
    out.sort(key=lambda item: item[0])
    return out


def _read_fortune_dir(directory: Path, argname: str) -> list[_Record]:
    files = _fortune_files(directory)
    if not files:
        raise ValueError(f"{argname}={str(directory)!r} holds no fortune-format files")
    return [(text, category) for category, path in files for text in parse_fortune_file(path)]


def _read_txt(path: Path) -> list[_Record]:
    return [(line, None) for line in _decode(path.read_bytes()).splitlines() if line.strip()]


def _label_str(value: object) -> str | None:
    if value is None:
        return None
    return str(value)


def _read_csv(path: Path, text_column: str, label_column: str, need_labels: bool, argname: str) -> list[_Record]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        _check_columns(columns, text_column, label_column, need_labels, f"{argname}={str(path)!r}")
        has_label = label_column in columns
        return [(row[text_column] or "", _label_str(row[label_column]) if has_label else None)
                for row in reader]


def _read_jsonl(path: Path, text_column: str, label_column: str, need_labels: bool,
                argname: str) -> list[_Record]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{argname}={str(path)!r} line {lineno} is not valid JSON: {err}") from err
            if not isinstance(obj, dict) or text_column not in obj:
                raise ValueError(f"{argname}={str(path)!r} line {lineno}: expected an object with key "
                                 f"text_column={text_column!r}, got {line.strip()[:80]!r}")
            if need_labels and label_column not in obj:
                raise ValueError(f"{argname}={str(path)!r} line {lineno}: no key label_column="
                                 f"{label_column!r} (keys: {sorted(obj)})")
            text = obj[text_column]
            if not isinstance(text, str):
                raise ValueError(f"{argname}={str(path)!r} line {lineno}: {text_column!r} must be a string, "
                                 f"got {type(text).__name__}")
            records.append((text, _label_str(obj.get(label_column))))
    return records


def _check_columns(columns, text_column, label_column, need_labels, where) -> None:
    if text_column not in columns:
        raise ValueError(f"{where} has no column text_column={text_column!r} (columns: {list(columns)})")
    if need_labels and label_column not in columns:
        raise ValueError(f"{where} has no column label_column={label_column!r} (columns: {list(columns)})")


def _read_hf(name: str, split: str, text_column: str, label_column: str, need_labels: bool,
             argname: str) -> list[_Record]:
    try:
        import datasets  # optional dependency, imported only when a dataset name is given
    except ImportError as err:
        raise ImportError(
            f"{argname}={name!r} is not an existing file or directory, and reading it as a Hugging Face "
            f"dataset needs the optional package `datasets` (pip install datasets)") from err
    ds = datasets.load_dataset(name, split=split)
    _check_columns(ds.column_names, text_column, label_column, need_labels, f"dataset {name!r} ({split})")
    texts = ds[text_column]
    if label_column not in ds.column_names:
        return [(t, None) for t in texts]
    feature = ds.features[label_column]
    names = getattr(feature, "names", None)  # ClassLabel: ints -> names
    labels = [names[v] if names is not None and isinstance(v, int) else _label_str(v) for v in ds[label_column]]
    return list(zip(texts, labels, strict=True))


def _read_records(source, *, text_column, label_column, split, need_labels, argname="source") -> list[_Record]:
    if source is None:
        if not FORTUNES_DIR.is_dir():
            raise FileNotFoundError(f"fortunes not found at {FORTUNES_DIR}: apt-get install fortunes, "
                                    f"or pass {argname}= (a directory, .txt, .csv, .jsonl or dataset name)")
        return _read_fortune_dir(FORTUNES_DIR, argname)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{argname} must be None, a path or a dataset name, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_fortune_dir(path, argname)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".txt":
            if need_labels:
                raise ValueError(f"{argname}={str(path)!r}: a .txt file has one text per line and no labels; "
                                 f"use load_texts, or a .csv/.jsonl with a label column")
            return _read_txt(path)
        if suffix in (".csv", ".tsv"):
            return _read_csv(path, text_column, label_column, need_labels, argname)
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path, text_column, label_column, need_labels, argname)
        raise ValueError(f"{argname}={str(path)!r}: unknown file type {suffix!r}; expected a directory of "
                         f"fortune files, .txt, .csv, .tsv or .jsonl")
    # A Path, a known suffix or an explicit ./ / ~ prefix means a file was meant, not a dataset name.
    looks_like_path = isinstance(source, os.PathLike) or suffix in (".txt", ".csv", ".tsv", ".jsonl", ".ndjson") \
        or str(source).startswith((".", "/", "~"))
    if looks_like_path:
        raise FileNotFoundError(f"{argname}={str(source)!r} does not exist")
    return _read_hf(str(source), split, text_column, label_column, need_labels, argname)


def _select(records: list[_Record], *, limit, seed, min_chars, max_chars, normalize_whitespace,
            argname, source) -> list[_Record]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars must be a non-negative int, got {min_chars!r}")
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < max(min_chars, 1)):
        raise ValueError(f"max_chars must be None or an int >= max(min_chars, 1) = {max(min_chars, 1)}, "
                         f"got {max_chars!r}")
    kept = []
    for text, label in records:
        text = _clean(text, normalize_whitespace)
        if len(text) < min_chars or (max_chars is not None and len(text) > max_chars):
            continue
        kept.append((text, label))
    if not kept:
        where = "the fortunes directory" if source is None else repr(str(source))
        raise ValueError(f"{argname}: {where} has no text with {min_chars} <= length <= {max_chars} characters "
                         f"({len(records)} records before filtering)")
    if seed is not None:
        random.Random(seed).shuffle(kept)
    return kept[:limit] if limit is not None else kept


def load_texts(
    source: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    seed: int | None = None,
    min_chars: int = 20,
    max_chars: int | None = 1000,
    text_column: str = "text",
    split: str = "train",
    normalize_whitespace: bool = True,
) -> list[str]:
    """Texts from ``source`` (see the module docstring), filtered by length, in deterministic order.

    Args:
        source: None (Debian fortunes), a directory of fortune files, a .txt/.csv/.tsv/.jsonl
            file, or a Hugging Face dataset name.
        limit: keep at most this many texts (after filtering, and after the shuffle if ``seed``).
        seed: if given, shuffle with ``random.Random(seed)`` before ``limit`` (a reproducible sample).
        min_chars, max_chars: texts shorter or longer (after whitespace normalisation) are dropped.
        text_column: column / key holding the text (CSV, JSONL, datasets).
        split: dataset split (Hugging Face datasets only).
        normalize_whitespace: collapse runs of whitespace (fortunes are indented and wrapped) to one space.

    Returns:
        ``list[str]`` of length ``<= limit``.
    """
    records = _read_records(source, text_column=text_column, label_column="label", split=split,
                            need_labels=False)
    kept = _select(records, limit=limit, seed=seed, min_chars=min_chars, max_chars=max_chars,
                   normalize_whitespace=normalize_whitespace, argname="source", source=source)
    return [text for text, _ in kept]


def _label_order(names: set[str]) -> list[str]:
    # Integer-like labels sort numerically ("2" before "10"), anything else alphabetically.
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def load_labeled_texts(
    source: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    seed: int | None = None,
    min_chars: int = 20,
    max_chars: int | None = 1000,
    text_column: str = "text",
    label_column: str = "label",
    split: str = "train",
    normalize_whitespace: bool = True,
) -> tuple[list[str], list[int], list[str]]:
    """Texts with class labels from ``source``; for fortunes the class is the category (file name).

    Arguments as :func:`load_texts`, plus ``label_column`` (CSV column / JSONL key / dataset
    column holding the label). ``.txt`` sources have no labels and raise ``ValueError``.

    Returns:
        ``(texts, labels, label_names)``: ``texts: list[str]`` of length n, ``labels: list[int]``
        of length n indexing ``label_names: list[str]`` (sorted; integer-like names numerically).
        ``label_names`` lists every class present in the source before ``limit``.
    """
    records = _read_records(source, text_column=text_column, label_column=label_column, split=split,
                            need_labels=True)
    missing = sum(label is None or label == "" for _, label in records)
    if missing:
        raise ValueError(f"source={str(source)!r}: {missing} of {len(records)} records have no "
                         f"label_column={label_column!r} value")
    kept = _select(records, limit=limit, seed=seed, min_chars=min_chars, max_chars=max_chars,
                   normalize_whitespace=normalize_whitespace, argname="source", source=source)
    names = _label_order({label for _, label in records})
    index = {name: i for i, name in enumerate(names)}
    return [t for t, _ in kept], [index[label] for _, label in kept], names
