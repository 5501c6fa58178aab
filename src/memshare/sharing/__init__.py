"""MemShare's algorithm in one place: step splitting, the two-stage filter, and the share decisions.

It reaches the KV cache only through the block manager's public methods (`read_kv`, `share`).
"""

from collections.abc import Callable

from memshare.config import ShareConfig
from memshare.engine.block_manager import BlockManager
from memshare.sharing.memshare import MemSharePolicy
from memshare.sharing.policy import SharingPolicy
from memshare.sharing.stage2 import UnrotateKeys


def make_policy(config: ShareConfig, block_manager: BlockManager, decode_token: Callable[[int], str],
                unrotate_keys: UnrotateKeys) -> SharingPolicy:
    if config.policy == "memshare":
        return MemSharePolicy(config, block_manager, decode_token, unrotate_keys)
    return SharingPolicy(block_manager)


__all__ = ["MemSharePolicy", "SharingPolicy", "make_policy"]
