"""MemShare inside vLLM v1, as the `vllm.general_plugins` entry point `memshare`.

Enable it per engine with `LLM(..., additional_config={"memshare": {"step_threshold": 0.7, ...}})` (any
`MemShareConfig` field) or for every engine with the environment: `MEMSHARE_POLICY=memshare` and optionally
`MEMSHARE_CONFIG='{"block_threshold": 0.61}'`. Disabled, the plugin changes nothing in vLLM.

The engine core runs the same `MemSharePolicy` as memshare's own engine after every step; stage 2 runs on every
worker rank (a worker extension, reached through `collective_rpc`), which returns per-layer partial sums over its own
KV heads that the engine core combines; a share remaps the request's block list in vLLM's block pool (ref_cnt + 1 on
the earlier block, the duplicate freed) and the workers replace the request's block-table row. `memshare_stats(llm)`
returns the counters.
"""

import json
import logging
import os
from typing import Any

from memshare.config import ShareConfig
from memshare.config import share_config as make_share_config

logger = logging.getLogger("memshare.vllm")
_registered = False


def _fields(additional_config: dict) -> dict | None:
    fields = additional_config.get("memshare")
    if fields is None and os.environ.get("MEMSHARE_POLICY", "none") != "none":
        fields = {"policy": os.environ["MEMSHARE_POLICY"], **json.loads(os.environ.get("MEMSHARE_CONFIG", "{}"))}
    if fields is not None and not isinstance(fields, dict):
        raise ValueError(f"additional_config['memshare'] must be a dict of MemShareConfig fields, got {fields!r}")
    return None if fields is None or fields.get("policy", "memshare") == "none" else fields


def share_config(additional_config: dict) -> ShareConfig | None:
    """The ShareConfig an engine asks for (additional_config["memshare"], else the environment), or None.

    Besides MemShareConfig's fields, `"verify": true` checks after every step that every rank's block-table rows
    equal the scheduler's and that vLLM's free blocks rose by exactly the blocks shared (counted in the stats)."""
    fields = _fields(additional_config)
    if fields is None:
        return None
    return make_share_config(**{"policy": "memshare", **{k: v for k, v in fields.items() if k != "verify"}})


def verify_requested(additional_config: dict) -> bool:
    return bool((_fields(additional_config) or {}).get("verify", False))


def register() -> None:
    """The entry point vLLM calls in each of its processes; installs the engine-core hooks once."""
    global _registered
    if _registered:
        return
    _registered = True
    from memshare.vllm_plugin import _vllm_api as api

    version = api.vllm_version()
    if not api.is_supported(version):
        message = (f"memshare's vLLM plugin supports vLLM {', '.join(v + 'x' for v in api.SUPPORTED_VERSIONS)}; "
                   f"this is vLLM {version}")
        if os.environ.get("MEMSHARE_POLICY", "none") != "none":
            raise RuntimeError(message)
        logger.warning("%s: MemShare stays off", message)
        return
    api.install_worker_extension(lambda additional: share_config(additional) is not None)
    api.patch_engine_core(_attach, _after_step, {"memshare_stats": _core_stats,
                                                 "memshare_check_rows": _core_check_rows})


def _attach(core: Any) -> None:
    from memshare.vllm_plugin import _vllm_api as api
    from memshare.vllm_plugin.core import VllmMemShare

    additional = api.additional_config(core)
    config = share_config(additional)
    core._memshare = None if config is None else VllmMemShare(core, config, verify_requested(additional))
    if core._memshare is not None:
        logger.info("MemShare on: step_threshold=%s block_threshold=%s stage1=%s", config.step_threshold,
                    config.block_threshold, config.stage1)


def _after_step(core: Any) -> None:
    if getattr(core, "_memshare", None) is not None:
        core._memshare.after_step()


def memshare_stats(llm: Any) -> dict[str, Any]:
    """MemShare's counters of a `vllm.LLM` (in-process or multiprocess engine core); {} when it is off."""
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is not None:
        return _core_stats(core)
    return client.call_utility("memshare_stats")


def _core_stats(core: Any) -> dict[str, Any]:
    memshare = getattr(core, "_memshare", None)
    return {} if memshare is None else memshare.stats()


def _core_check_rows(core: Any) -> list[str]:
    memshare = getattr(core, "_memshare", None)
    return [] if memshare is None else memshare.check_worker_rows()
