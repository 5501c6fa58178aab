"""The contract between the engine and its KV policies (engine/policy.py): the engine's sequences and block manager,
the vLLM plugin's views, and every registered policy implement the Protocols."""

import inspect

import pytest
import torch

from memshare.config import policy_names, share_config
from memshare.engine.block_manager import BlockManager
from memshare.engine.policy import BlockOps, KVBlockOps, KVPolicy, ModelAccess, PolicyRequest, make_policy
from memshare.engine.sequence import Sequence
from memshare.sampling_params import SamplingParams
from memshare.vllm_plugin.core import RequestView, VllmBlocks

MODEL = ModelAccess(decode=lambda ids: " ".join(map(str, ids)), unrotate_keys=lambda keys, positions: keys,
                    embed_tokens=lambda ids: torch.zeros(len(ids), 8))


def protocol_members(protocol: type) -> set[str]:
    """The attributes and methods a Protocol declares, its bases' included."""
    names: set[str] = set()
    for klass in protocol.__mro__[:-3]:  # the Protocol's own classes, without Protocol, Generic and object
        names |= set(klass.__annotations__) | {name for name in vars(klass) if not name.startswith("_")}
    return names


def test_requests_of_both_engines_are_policy_requests() -> None:
    seq = Sequence(0, "r", 0, [1, 2, 3], 2, SamplingParams(), 8, num_computed_tokens=3)
    view = RequestView("r", num_prompt_tokens=2, token_ids=[1, 2, 3], num_computed_tokens=3)
    for request in (seq, view):
        assert isinstance(request, PolicyRequest)
        assert (request.num_tokens, request.num_output_tokens, request.num_cached_kv_tokens) == (3, 1, 3)


def test_block_operations_of_both_engines() -> None:
    assert isinstance(BlockManager(8, 4), KVBlockOps)
    # The plugin shares only: it neither evicts nor reads K/V on the engine core (stage 2 runs on the workers).
    members = protocol_members(BlockOps) - {"block_size"}
    assert all(callable(getattr(VllmBlocks, name)) for name in members)
    assert not all(hasattr(VllmBlocks, name) for name in protocol_members(KVBlockOps) - protocol_members(BlockOps))


def test_a_class_missing_a_member_is_not_a_policy_request() -> None:
    view = RequestView("r", num_prompt_tokens=2)
    assert isinstance(view, PolicyRequest)
    assert not isinstance(object(), PolicyRequest) and not isinstance(view, KVBlockOps)


@pytest.mark.parametrize("name", policy_names())
def test_every_registered_policy_is_a_kv_policy(name: str) -> None:
    policy = make_policy(share_config(name), BlockManager(8, 4), MODEL)
    assert isinstance(policy, KVPolicy)
    # Its hooks take the arguments the engine passes (a subclass may not narrow them).
    for hook in ("observe", "after_step", "finish", "saved_blocks"):
        expected = list(inspect.signature(getattr(KVPolicy, hook)).parameters)
        assert list(inspect.signature(getattr(type(policy), hook)).parameters) == expected, (name, hook)
