"""MemShare's algorithm (step splitting, the two-stage filter, the share decisions) and the baselines it is
measured against (random sharing, StreamingLLM, H2O, R-KV): one module per policy, each with its config dataclass
(a `ShareConfig`) and a `register_policy` call, so that importing this package makes them all selectable.

All reach the KV cache only through the block manager's public methods (`read_kv`, `share`, `evict`).
"""

# The import order is the registration order, the order tables and `--share` list the policies in.
# isort: off
from memshare.sharing.memshare import MemShareConfig, MemSharePolicy
from memshare.sharing.random_share import RandomShareConfig, RandomSharePolicy
from memshare.sharing.eviction import (
    EvictionPolicy,
    H2OConfig,
    H2OPolicy,
    RKVConfig,
    RKVPolicy,
    StreamingLLMConfig,
)
# isort: on

__all__ = ["EvictionPolicy", "H2OConfig", "H2OPolicy", "MemShareConfig", "MemSharePolicy", "RKVConfig", "RKVPolicy",
           "RandomShareConfig", "RandomSharePolicy", "StreamingLLMConfig"]
