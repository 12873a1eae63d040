"""Text data: tokenised datasets with padding masks and masking weights, registered by name.

``text_classification``, ``text_corpus`` (masked-LM) and ``parallel_text`` read standard files
(JSONL/CSV/TSV) or the offline sources that ``python -m relkd.data.text.prepare`` caches from Debian
packages. A text batch is ``{"input": [B, L] ids, "target": [B], "index": [B], "mask_weight": [B, L],
...}``: the engine, the loaders and every step see it as they see image batches. Tokenisation needs
``transformers`` (``pip install 'relkd[text]'``), imported only when a dataset is built.
"""

from relkd.data.text import datasets  # noqa: F401  (registration)
from relkd.data.text.dataset import TokenDataset, cloze_test, mask_weights, text_bundle, token_weights
from relkd.data.text.sources import cached_file, read_records, text_data_dir
from relkd.data.text.tokenize import encode, load_tokenizer, special_ids

__all__ = [
    "TokenDataset",
    "cached_file",
    "cloze_test",
    "encode",
    "load_tokenizer",
    "mask_weights",
    "read_records",
    "special_ids",
    "text_bundle",
    "text_data_dir",
    "token_weights",
]
