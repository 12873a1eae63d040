"""Build the cached text files of the offline sources from installed packages.

    python -m relkd.data.text.prepare                 # every source whose package is installed
    python -m relkd.data.text.prepare fortunes bible  # some of them
    python -m relkd.data.text.prepare --out DIR       # elsewhere than $RELKD_TEXT_DATA / ~/.cache/relkd/text

Sources and the Debian packages they read (``apt-get install fortunes sword-text-kjv sword-text-sparv``;
``pip install pysword`` comes with ``relkd[text]``):

* ``fortunes``: /usr/share/games/fortunes (package ``fortunes``), one record per epigram, labelled by
  its file.
* ``bible``: the SWORD modules engKJV2006eb and spaRV1909eb under /usr/share/sword (packages
  ``sword-text-kjv``, ``sword-text-sparv``), aligned verse by verse; ``--books nt`` (default, 7,957
  verses, about two minutes) or ``all`` (31,084 verses, several minutes: pysword decompresses verse by
  verse).
* ``messages``: msgid/msgstr pairs of /usr/share/locale/es/LC_MESSAGES/*.mo (what is installed).
* ``debian``: package long descriptions and their one-line synopses (document -> summary), with each
  package's source package and section, from apt's indexes (:mod:`relkd.data.text.debian`; the long
  descriptions need ``apt-get -o Acquire::Languages=en update`` once) and /var/lib/dpkg/status.
"""

from __future__ import annotations

import argparse
import gettext
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from relkd.data.text.debian import debian_descriptions
from relkd.data.text.sources import FILES, text_data_dir

__all__ = ["bible_pairs", "fortunes", "main", "message_pairs"]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
SWORD_DIR = Path("/usr/share/sword")
LOCALE_DIR = Path("/usr/share/locale/es/LC_MESSAGES")
ENGLISH, SPANISH = "engKJV2006eb", "spaRV1909eb"
_SPACES = re.compile(r"\s+")


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text.replace("¶", " ")).strip()


def fortunes(folder: Path = FORTUNES_DIR) -> Iterator[dict[str, str]]:
    """``{"text", "label"}`` for every epigram of the fortune files in ``folder`` (files with a
    ``.dat`` index; separators are lines holding ``%``)."""
    files = sorted(p for p in folder.iterdir() if p.suffix == "" and p.with_suffix(".dat").exists())
    if not files:
        raise FileNotFoundError(f"no fortune files in {folder}: apt-get install fortunes")
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for item in re.split(r"^%$", text, flags=re.MULTILINE):
            item = _clean(item)
            if item:
                yield {"text": item, "label": path.name}


def bible_pairs(books: str = "nt", folder: Path = SWORD_DIR) -> Iterator[dict[str, str]]:
    """``{"en", "es", "ref"}`` for the verses present in both SWORD modules (``books``: ``nt``,
    ``ot`` or ``all``)."""
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise ImportError("the bible source reads SWORD modules with pysword: pip install pysword") from None
    modules = SwordModules(str(folder))
    found = modules.parse_modules()
    missing = [m for m in (ENGLISH, SPANISH) if m not in found]
    if missing:
        raise FileNotFoundError(
            f"no SWORD module {missing[0]} in {folder}: apt-get install sword-text-kjv sword-text-sparv"
        )
    english, spanish = (modules.get_bible_from_module(m) for m in (ENGLISH, SPANISH))
    structure = english.get_structure().get_books()
    parts = ["ot", "nt"] if books == "all" else [books]
    for part in parts:
        for book in structure[part]:
            en = list(english.get_iter(books=[book.osis_name]))
            es = list(spanish.get_iter(books=[book.osis_name]))
            refs = [(c + 1, v + 1) for c, n in enumerate(book.chapter_lengths) for v in range(n)]
            for (chapter, verse), a, b in zip(refs, en, es, strict=False):
                a, b = _clean(a), _clean(b)
                if a and b:
                    yield {"en": a, "es": b, "ref": f"{book.osis_name} {chapter}:{verse}"}


def message_pairs(folder: Path = LOCALE_DIR) -> Iterator[dict[str, str]]:
    """``{"en", "es", "domain"}`` for the translated messages of the catalogues in ``folder``: plain
    messages of two or more words (no format directives, no plural forms, no context)."""
    seen: set[str] = set()
    for path in sorted(folder.glob("*.mo")):
        try:
            with path.open("rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except (OSError, UnicodeDecodeError, gettext.Error):
            continue
        for key, value in catalog.items():
            if not isinstance(key, str) or not key or "\x04" in key or key in seen:
                continue
            en, es = _clean(key), _clean(value)
            if len(en.split()) < 2 or not es or es == en or "%" in en or "{" in en or "\\" in en:
                continue
            seen.add(key)
            yield {"en": en, "es": es, "domain": path.stem}


def _write(path: Path, records: Iterable[dict[str, str]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m relkd.data.text.prepare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("sources", nargs="*", choices=[*FILES, []], help="default: every source available")
    parser.add_argument("--out", help="cache folder (default $RELKD_TEXT_DATA or ~/.cache/relkd/text)")
    parser.add_argument("--books", default="nt", choices=["nt", "ot", "all"], help="bible: which verses")
    args = parser.parse_args(argv)
    out = text_data_dir(args.out)
    makers = {
        "fortunes": lambda: fortunes(),
        "bible": lambda: bible_pairs(args.books),
        "messages": lambda: message_pairs(),
        "debian": lambda: debian_descriptions(),
    }
    wanted = args.sources or list(makers)
    failed = 0
    for source in wanted:
        path = out / FILES[source]
        try:
            n = _write(path, makers[source]())
        except (FileNotFoundError, ImportError) as e:
            print(f"{source}: skipped: {e}", file=sys.stderr)
            failed += bool(args.sources)
            continue
        print(f"{source}: {n} records -> {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
