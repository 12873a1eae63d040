"""Seeds derived from (run seed, epoch, stream): each epoch's randomness is a function of them.

A resumed run that calls ``set_epoch(e)`` therefore sees the same shuffle and the same augmentation
as an uninterrupted run, and the shuffle and augmentation streams never share a seed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AUGMENT", "SHUFFLE", "derive_seed"]

SHUFFLE = 0
AUGMENT = 1


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer ``keys`` (e.g. ``seed, epoch, SHUFFLE``).

    Uses numpy's ``SeedSequence`` hash, so nearby keys (epoch 3 and 4) give unrelated seeds.
    """
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seeds, epochs and streams must be non-negative integers, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))
