"""Context-parallel (ring) attention over torch.distributed; see docs/distributed.md.

Imported on demand (``import tileattn.distributed``), so ``import tileattn`` stays light.

    >>> from tileattn.distributed import ring_attention, shard, unshard
    >>> out = unshard(ring_attention(shard(q), shard(k), shard(v), causal=True))
"""

from .attention import ring_attention, ring_attention_local
from .schedule import choose_schedule, plan_blocks
from .shard import join, shard, split, unshard

__all__ = ["ring_attention", "ring_attention_local", "shard", "unshard", "split", "join", "plan_blocks",
           "choose_schedule"]
