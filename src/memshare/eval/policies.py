"""Policy specs on the command line: `none,memshare:block_threshold=0.61,h2o:kv_budget=0.8,random:share_ratio=memshare`.

Each comma-separated item is a registered policy name with optional `:field=value` overrides of its config's
fields. The value `memshare` for a field the policy registered as matchable (random's `share_ratio`, the evictions'
`kv_budget`) means "match the MemShare run listed before this one": the random policy then shares at its affected
ratio, an eviction policy keeps the fraction 1 - affected ratio.
"""

import gc
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from memshare.config import (
    KV_CACHE_DTYPES,
    EngineConfig,
    ShareConfig,
    check_kv_cache_dtype,
    policy_names,
    registration,
    share_config,
)
from memshare.engine.model_runner import kv_block_bytes
from memshare.errors import KVCacheDtypeError


@dataclass(slots=True)
class PolicySpec:
    share: ShareConfig
    match: tuple[str, ...] = ()  # fields to take from the preceding MemShare run
    kv_cache_dtype: str = "auto"

    @property
    def label(self) -> str:
        """The policy with its knobs (`memshare` where matched), its other fields that are off their default, and
        its KV dtype unless `auto`."""
        knobs, default = registration(self.share.policy).knobs, type(self.share)()
        parts = [f"{f.name}={'memshare' if f.name in self.match else getattr(self.share, f.name)}"
                 for f in sorted(fields(self.share), key=lambda f: f.name not in knobs)
                 if f.name in knobs or f.name in self.match or getattr(self.share, f.name) != getattr(default, f.name)]
        dtype = "" if self.kv_cache_dtype == "auto" else f" [{self.kv_cache_dtype}]"
        return self.share.policy + (f"({', '.join(parts)})" if parts else "") + dtype


def check_kv_cache_dtypes(kv_cache_dtypes: list[str]) -> None:
    if not kv_cache_dtypes:
        raise KVCacheDtypeError(f"no kv_cache_dtype given; choose from {KV_CACHE_DTYPES}")
    for dtype in kv_cache_dtypes:
        check_kv_cache_dtype(dtype)


def expand_kv_dtypes(specs: list[PolicySpec], kv_cache_dtypes: list[str]) -> list[PolicySpec]:
    """Every spec at every KV dtype, dtype by dtype, so a matched spec matches the MemShare run of its own dtype."""
    check_kv_cache_dtypes(kv_cache_dtypes)
    return [replace(spec, kv_cache_dtype=dtype) for dtype in dict.fromkeys(kv_cache_dtypes) for spec in specs]


def engine_for(model: str, spec: PolicySpec, engine: dict[str, Any]) -> dict[str, Any]:
    """EngineConfig keyword arguments of a spec's run: `engine` with the spec's KV dtype, its budget in bytes. A
    budget given in blocks (`num_kv_blocks`) counts blocks of the model's own dtype (`auto`); another KV dtype gets
    the same bytes, so matched memory means equal KV bytes."""
    kwargs = engine | {"kv_cache_dtype": spec.kv_cache_dtype}
    if spec.kv_cache_dtype == "auto" or not engine.get("num_kv_blocks"):
        return kwargs
    reference = EngineConfig(model=model, **(engine | {"kv_cache_dtype": "auto"}))
    return kwargs | {"num_kv_blocks": None, "kv_cache_memory": engine["num_kv_blocks"] * kv_block_bytes(reference)}


def _convert(raw: str, default: object) -> object:
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, (int, float)):
        number = float(raw)
        return int(number) if isinstance(default, int) and number.is_integer() else number
    if isinstance(default, tuple):
        return tuple(raw.split("|"))
    return raw


def _field_defaults(policy: str) -> dict[str, Any]:
    config = registration(policy).config()
    return {f.name: getattr(config, f.name) for f in fields(config)}


def parse_policies(text: str, defaults: dict[str, Any] | None = None) -> list[PolicySpec]:
    """PolicySpecs from a comma-separated list, each starting from the `defaults` its policy has a field for;
    raises ValueError naming the bad item."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, *overrides = item.split(":")
        try:
            known = _field_defaults(name)
        except ValueError as error:
            raise ValueError(f"{error} (in {item!r})") from error
        matchable = dict(registration(name).match)
        values = {k: v for k, v in (defaults or {}).items() if k in known}
        match: list[str] = []
        for override in overrides:
            key, sep, raw = override.partition("=")
            if not sep or key not in known:
                raise ValueError(f"bad override {override!r} in {item!r}: use field=value with a field of {name!r} "
                                 f"({', '.join(known)})")
            if raw == "memshare" and key in matchable:
                match.append(key)
                continue
            try:
                values[key] = _convert(raw, known[key])
            except ValueError as error:
                raise ValueError(f"bad value for {key} in {item!r}: {raw!r}") from error
        specs.append(PolicySpec(share_config(name, **values), tuple(match)))
    if not specs:
        raise ValueError("no policy given")
    return specs


def parse_sweep(items: list[str] | None) -> dict[str, list[str]]:
    """`["block_threshold=0.62,0.55,0.5", ...]` -> {field: values}; every field needs as many values."""
    known = {k for name in policy_names() for k in registration(name).knobs}
    sweep: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or key not in known or not values:
            raise ValueError(f"bad --sweep {item!r}: use field=v1,v2,... with a knob of a policy "
                             f"({', '.join(sorted(known))})")
        sweep[key] = values
    if len({len(v) for v in sweep.values()}) > 1:
        raise ValueError(f"--sweep fields need as many values each, got {sweep}")
    return sweep


def expand_sweep(specs: list[PolicySpec], sweep: dict[str, list[str]]) -> list[PolicySpec]:
    """The specs once per sweep level, level by level, each swept field set on the specs whose policy has it as a
    knob (and does not match it to MemShare); a spec the sweep leaves unchanged (dense) runs once, a matched spec
    once per MemShare run it is matched to."""
    if not sweep:
        return specs
    expanded: list[tuple[PolicySpec, PolicySpec | None]] = []  # (spec, the MemShare spec it is matched to)
    for level in range(len(next(iter(sweep.values())))):
        source: PolicySpec | None = None
        for spec in specs:
            values = {k: _convert(v[level], getattr(spec.share, k)) for k, v in sweep.items()
                      if k in registration(spec.share.policy).knobs and k not in spec.match}
            try:
                swept = PolicySpec(replace(spec.share, **values), spec.match, spec.kv_cache_dtype)
            except ValueError as error:
                raise ValueError(f"--sweep level {level + 1} for {spec.label}: {error}") from error
            entry = (swept, source if swept.match else None)
            if entry not in expanded:
                expanded.append(entry)
            if swept.share.policy == "memshare":
                source = swept
    return [spec for spec, _ in expanded]


R = TypeVar("R")


def matched(spec: PolicySpec, memshare_affected_ratio: float) -> ShareConfig:
    """The spec's ShareConfig with its `memshare`-matched fields filled from a MemShare run's affected ratio."""
    rules = dict(registration(spec.share.policy).match)
    return replace(spec.share, **{name: rules[name](memshare_affected_ratio) for name in spec.match})


def share_for(spec: PolicySpec, memshare_ratio: float | None) -> ShareConfig:
    """The spec's ShareConfig, `=memshare` fields matched to the affected ratio of the last MemShare run."""
    if not spec.match:
        return spec.share
    if memshare_ratio is None:
        raise ValueError(f"{spec.label}: '=memshare' needs a memshare policy listed before it")
    return matched(spec, memshare_ratio)


def run_matched(specs: list[PolicySpec], run: Callable[[PolicySpec, ShareConfig], R],
                affected_ratio: Callable[[R], float]) -> list[R]:
    """`run` each spec in order, `=memshare` fields matched to the last MemShare result before it."""
    results: list[R] = []
    memshare_ratio = None
    for spec in specs:
        share = share_for(spec, memshare_ratio)
        results.append(run(spec, share))
        # An engine holds reference cycles (policy callbacks): collect it before the next one allocates its KV.
        gc.collect()
        if share.policy == "memshare":
            memshare_ratio = affected_ratio(results[-1])
    return results
