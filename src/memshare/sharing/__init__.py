"""MemShare's algorithm (step splitting, the two-stage filter, the share decisions) and the baselines it is
measured against (random sharing, StreamingLLM, H2O, R-KV), each a policy the engine calls between steps.

All reach the KV cache only through the block manager's public methods (`read_kv`, `share`, `evict`).
"""

from memshare.config import ShareConfig
from memshare.engine.block_manager import BlockManager
from memshare.sharing.eviction import EvictionPolicy, H2OPolicy, RKVPolicy
from memshare.sharing.memshare import MemSharePolicy
from memshare.sharing.policy import ModelAccess, SharingPolicy
from memshare.sharing.random_share import RandomSharePolicy


def make_policy(config: ShareConfig, block_manager: BlockManager, model: ModelAccess) -> SharingPolicy:
    if config.policy == "memshare":
        return MemSharePolicy(config, block_manager, model)
    if config.policy == "random":
        return RandomSharePolicy(config, block_manager)
    eviction = {"streamingllm": EvictionPolicy, "h2o": H2OPolicy, "rkv": RKVPolicy}.get(config.policy)
    if eviction is not None:
        return eviction(config, block_manager)
    return SharingPolicy(block_manager)


__all__ = ["EvictionPolicy", "H2OPolicy", "MemSharePolicy", "ModelAccess", "RKVPolicy", "RandomSharePolicy",
           "SharingPolicy", "make_policy"]
