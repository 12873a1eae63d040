"""Where text comes from: standard files (JSONL, CSV, TSV) and the offline sources cached by
``python -m relkd.data.text.prepare``.

The cache folder is ``root`` when given, else ``$RELKD_TEXT_DATA``, else ``~/.cache/relkd/text``. Its
files are JSONL, one record per line:

===============================  ===================================================================
``fortunes.jsonl``               ``{"text", "label"}``: Debian ``fortunes`` (the epigrams of
                                 /usr/share/games/fortunes, labelled by their file: art, computers, food ...)
``bible_en_es.jsonl``            ``{"en", "es", "ref"}``: aligned verses of the Debian SWORD modules
                                 ``sword-text-kjv`` (King James) and ``sword-text-sparv`` (Reina-Valera
                                 1909), read with ``pysword``
``messages_en_es.jsonl``         ``{"en", "es", "domain"}``: the Spanish translation catalogues of installed
                                 programs (/usr/share/locale/es/LC_MESSAGES/*.mo, read with ``gettext``)
``debian_descriptions.jsonl``    ``{"document", "summary", "package", "source", "section"}``: Debian
                                 package long descriptions and their one-line synopses (apt's indexes and
                                 dpkg's status, :mod:`relkd.data.text.debian`)
===============================  ===================================================================
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DATA_ENV", "FILES", "PREPARE", "cached_file", "read_records", "text_data_dir"]

DATA_ENV = "RELKD_TEXT_DATA"
PREPARE = "python -m relkd.data.text.prepare"
FILES = {
    "fortunes": "fortunes.jsonl",
    "bible": "bible_en_es.jsonl",
    "messages": "messages_en_es.jsonl",
    "debian": "debian_descriptions.jsonl",
}


def text_data_dir(root: str | Path | None = None) -> Path:
    """The cache folder (see the module docstring)."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "relkd" / "text"


def cached_file(source: str, root: str | Path | None = None) -> Path:
    """The cached file of an offline source (``fortunes``, ``bible``, ``messages``, ``debian``).

    Raises:
        KeyError: an unknown source. FileNotFoundError: not prepared yet; says how to prepare it.
    """
    if source not in FILES:
        raise KeyError(f"unknown text source {source!r}; the offline sources are {', '.join(FILES)}")
    path = text_data_dir(root) / FILES[source]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: build it with `{PREPARE} {source}` (see its --help for the Debian "
            f"packages it reads), set ${DATA_ENV} or data.root to the folder holding it, or give your "
            "own file with data.options.path"
        )
    return path


def read_records(path: str | Path, fields: Sequence[str]) -> list[dict[str, Any]]:
    """The records of a JSONL (``.jsonl``/``.json``, one object a line), CSV or TSV file (a header row
    naming the columns), keeping ``fields``.

    Raises:
        KeyError: a record lacks a field; the message names the file, the line and the fields it has.
    """
    path = Path(path)
    rows = list(_rows(path))
    out = []
    for line, row in rows:
        missing = [f for f in fields if f not in row]
        if missing:
            raise KeyError(f"{path}, record {line}: no field {missing[0]!r} (it has {sorted(row)})")
        out.append({f: row[f] for f in fields})
    return out


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"no text file {path}")
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".json"):
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield i, json.loads(line)
        elif suffix in (".csv", ".tsv"):
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            for i, row in enumerate(reader, 2):
                yield i, row
        else:
            raise ValueError(f"{path}: expected a .jsonl, .csv or .tsv file")
