"""Debian package descriptions as document -> summary pairs: the long description and its one-line synopsis.

Every Debian package has a synopsis (the first line of its ``Description``, at most about 80 characters)
and a long description of one or more paragraphs. apt keeps them in index files under
/var/lib/apt/lists: the long descriptions of every package of a suite are in its
``*_i18n_Translation-en*`` files (``Description-en``), which apt downloads only when its languages
include English: ``apt-get -o Acquire::Languages=en update`` once (Debian images often set
``Acquire::Languages "none"``). The ``*_Packages*`` files give each package's source package and
section; the installed packages' full descriptions are also in /var/lib/dpkg/status, the fallback
when no Translation file is there. Index files may be plain or compressed (gz, xz, bz2 read here;
lz4 and zst through ``apt-helper cat-file``, ``lz4`` or ``zstd``).

The long description format (Debian Policy 5.6.13): continuation lines start with a space, a line
holding only ``.`` separates paragraphs, lines starting with two spaces are shown verbatim. Here the
lines of a paragraph are joined by spaces and paragraphs by a blank (one string of text).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["APT_LISTS", "DPKG_STATUS", "debian_descriptions", "long_description", "read_index", "stanzas"]

APT_LISTS = Path("/var/lib/apt/lists")
DPKG_STATUS = Path("/var/lib/dpkg/status")
_SPACES = re.compile(r"\s+")
_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}
_TOOLS = {".lz4": ["lz4", "-dc"], ".zst": ["zstd", "-dc"]}


def read_index(path: Path) -> str:
    """The text of an apt index file, decompressed (see the module docstring)."""
    suffix = path.suffix
    if suffix in _OPENERS:
        with _OPENERS[suffix](path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    if suffix in _TOOLS:
        helper = Path("/usr/lib/apt/apt-helper")
        if helper.exists():
            command = [str(helper), "cat-file", str(path)]
        elif shutil.which(_TOOLS[suffix][0]):
            command = [*_TOOLS[suffix], str(path)]
        else:
            raise FileNotFoundError(f"{path}: reading {suffix} needs apt-helper or {_TOOLS[suffix][0]}")
        out = subprocess.run(command, check=True, capture_output=True)
        return out.stdout.decode("utf-8", errors="replace")
    return path.read_bytes().decode("utf-8", errors="replace")


def stanzas(text: str) -> Iterator[dict[str, str]]:
    """The paragraphs of a deb822 file (Packages, Translation, dpkg status) as ``{field: value}``; a
    multi-line value keeps its continuation lines (with their leading space) after a newline."""
    record: dict[str, str] = {}
    field = None
    for line in text.splitlines():
        if not line.strip():
            if record:
                yield record
            record, field = {}, None
        elif line[0] in " \t":
            if field is not None:
                record[field] += "\n" + line
        else:
            field, _, value = line.partition(":")
            record[field] = value.strip()
    if record:
        yield record


def long_description(lines: Iterable[str]) -> str:
    """The continuation lines of a ``Description`` field as one string of text."""
    paragraphs, current = [], []
    for line in lines:
        body = line[1:] if line[:1] in (" ", "\t") else line
        if body.strip() == ".":
            paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(body.strip())
    paragraphs.append(" ".join(current))
    return " ".join(_SPACES.sub(" ", p).strip() for p in paragraphs if p.strip())


def _split(value: str) -> tuple[str, str]:
    synopsis, _, rest = value.partition("\n")
    return _SPACES.sub(" ", synopsis).strip(), long_description(rest.splitlines()) if rest else ""


def _origins(lists: Path) -> dict[str, tuple[str, str]]:
    """``{package: (source package, section)}`` from the Packages files."""
    out: dict[str, tuple[str, str]] = {}
    for path in sorted(lists.glob("*_Packages*")):
        for record in stanzas(read_index(path)):
            name = record.get("Package")
            if name and name not in out:
                source = record.get("Source", name).split()[0]
                out[name] = (source, record.get("Section", "").rsplit("/", 1)[-1])
    return out


def debian_descriptions(lists: Path = APT_LISTS, status: Path = DPKG_STATUS) -> Iterator[dict[str, str]]:
    """``{"document", "summary", "package", "source", "section"}`` for every package description apt
    and dpkg know, each distinct (summary, document) pair once, in file order.

    Raises:
        FileNotFoundError: no index holds a long description; the message says how to get them.
    """
    origins = _origins(lists) if lists.is_dir() else {}
    files = sorted(lists.glob("*_i18n_Translation-en*")) if lists.is_dir() else []
    sources = [(path, "Description-en") for path in files]
    if status.is_file():
        sources.append((status, "Description"))
    seen: set[tuple[str, str]] = set()
    found = False
    for path, key in sources:
        for record in stanzas(read_index(path)):
            name, value = record.get("Package"), record.get(key)
            if not name or not value:
                continue
            summary, document = _split(value)
            if not summary or not document or (summary.lower(), document) in seen:
                continue
            seen.add((summary.lower(), document))
            found = True
            source, section = origins.get(name, (name, record.get("Section", "").rsplit("/", 1)[-1]))
            yield {"document": document, "summary": summary, "package": name, "source": source,
                   "section": section}  # fmt: skip
    if not found:
        raise FileNotFoundError(
            f"no package description in {lists}/*_i18n_Translation-en* or {status}: run "
            "`apt-get -o Acquire::Languages=en update` once to fetch the English descriptions"
        )
