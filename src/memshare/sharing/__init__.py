"""MemShare's algorithm (step splitting, the two-stage filter, the share decisions) and the baselines it is
measured against (random sharing, StreamingLLM, H2O, R-KV): one module per policy, each with a `register_policy`
call beside its policy class, so that importing this package makes them all selectable. Their config dataclasses
(each a `ShareConfig`) are together in `configs.py`.

All reach the KV cache only through the block manager's public methods (`read_kv`, `share`, `evict`).
"""

# The import order is the registration order, the order tables and `--share` list the policies in.
# isort: off
from memshare.sharing.memshare import MemSharePolicy
from memshare.sharing.random_share import RandomSharePolicy
from memshare.sharing.eviction import EvictionPolicy, H2OPolicy, RKVPolicy
# isort: on
from memshare.sharing.configs import H2OConfig, MemShareConfig, RandomShareConfig, RKVConfig, StreamingLLMConfig

__all__ = ["EvictionPolicy", "H2OConfig", "H2OPolicy", "MemShareConfig", "MemSharePolicy", "RKVConfig", "RKVPolicy",
           "RandomShareConfig", "RandomSharePolicy", "StreamingLLMConfig"]
