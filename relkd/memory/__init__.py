"""Memory for contrastive distillation: per-example banks, a FIFO queue, and negative sampling.

All state is held in buffers, so it follows the loss module across devices, into ``state_dict`` and
back; nothing here is trainable.
"""

from relkd.memory.bank import MemoryBank
from relkd.memory.queue import QueueBank
from relkd.memory.sampling import NegativeSampler

__all__ = ["MemoryBank", "QueueBank", "NegativeSampler"]
