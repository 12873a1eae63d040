"""Where dataset files are looked for, and the error that says where they were not found.

Nothing is ever downloaded: a dataset is read from the first candidate folder that holds all its
files, and a missing dataset raises ``FileNotFoundError`` listing every folder tried and how to
provide the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = ["find_dir", "search_roots"]


def search_roots(
    root: str | Path | None,
    env_var: str,
    data_subdir: str | None,
    system_dirs: Iterable[str | Path] = (),
) -> list[tuple[Path, str]]:
    """The candidate roots in search order, each with where it came from.

    Order: the explicit ``root``; ``$env_var``; ``$RELKD_DATA/data_subdir`` (``$RELKD_DATA`` itself
    when ``data_subdir`` is ``""``, skipped when None); then ``system_dirs``.
    """
    out: list[tuple[Path, str]] = []
    if root is not None:
        out.append((Path(root).expanduser(), "root argument"))
    if os.environ.get(env_var):
        out.append((Path(os.environ[env_var]).expanduser(), f"${env_var}"))
    if data_subdir is not None and os.environ.get("RELKD_DATA"):
        base = Path(os.environ["RELKD_DATA"]).expanduser()
        label = f"$RELKD_DATA/{data_subdir}" if data_subdir else "$RELKD_DATA"
        out.append((base / data_subdir if data_subdir else base, label))
    out.extend((Path(d), "default") for d in system_dirs)
    return out


def find_dir(
    dataset: str,
    roots: Sequence[tuple[Path, str]],
    layouts: Sequence[str],
    is_complete: Callable[[Path], bool],
    wanted: str,
    how_to: str,
) -> Path:
    """The first folder ``root / layout`` (roots outer loop, layouts inner) that ``is_complete``.

    Args:
        dataset: name for the error message.
        roots: ``(folder, source)`` pairs from ``search_roots``.
        layouts: sub-paths to try under each root; ``""`` is the root itself.
        is_complete: whether a folder holds every file the dataset needs.
        wanted: the files looked for, for the error message.
        how_to: how to provide the files, for the error message.

    Raises:
        FileNotFoundError: no candidate is complete; the message lists every folder tried.
    """
    tried = []
    for base, source in roots:
        for layout in layouts:
            folder = base / layout if layout else base
            if is_complete(folder):
                return folder
            tried.append(f"  {folder}  ({source})")
    looked = "\n".join(tried) if tried else "  (nowhere: no root given and no variable set)"
    raise FileNotFoundError(
        f"{dataset}: could not find {wanted}. Looked in:\n{looked}\nTo provide them: {how_to}"
    )
