"""Policy specs on the command line: `none,memshare:block_threshold=0.61,h2o:kv_budget=0.8,random:share_ratio=memshare`.

Each comma-separated item is a registered policy name with optional `:field=value` overrides of its config's
fields. The value `memshare` for a field the policy registered as matchable (random's `share_ratio`, the evictions'
`kv_budget`) means "match the memory the MemShare run listed before this one saved": the baseline is run, its
memory saved measured (engine/stats.py's mean over steps), and run again at a corrected knob until it lands within
SEARCH_TOLERANCE of MemShare's (`search_match`). The knob is set through the policy's match rule from a level, an
affected ratio (random shares that fraction, an eviction keeps 1 - level): memory saved grows with the level.
"""

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial
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

MATCH_TOLERANCE = 0.02  # a baseline further than this from MemShare's memory saved is reported as not matched
SEARCH_TOLERANCE = 0.01  # the search stops this close, well inside MATCH_TOLERANCE
MAX_TRIES = 6  # runs of one matched baseline, the first (at MemShare's affected ratio) included


@dataclass(slots=True)
class Try:
    """One run of a matched baseline: its level (see the module docstring) and the memory it saved."""

    level: float
    memory_saved: float


def matched(spec: PolicySpec, level: float) -> ShareConfig:
    """The spec's ShareConfig with its `memshare`-matched fields set from `level` by the policy's match rules."""
    rules = dict(registration(spec.share.policy).match)
    return replace(spec.share, **{name: round(rules[name](level), 6) for name in spec.match})


def share_for(spec: PolicySpec, level: float | None) -> ShareConfig:
    """The spec's ShareConfig, `=memshare` fields set from `level` (None: no MemShare run before it)."""
    if not spec.match:
        return spec.share
    if level is None:
        raise ValueError(f"{spec.label}: '=memshare' needs a memshare policy listed before it")
    return matched(spec, level)


def knob_text(spec: PolicySpec, level: float) -> str:
    share = matched(spec, level)
    return ", ".join(f"{name}={getattr(share, name):g}" for name in spec.match)


def next_level(target: float, tries: list[Try]) -> float | None:
    """The level to run next to reach `target` memory saved: a secant step inside the bracket the tries give (kept
    a quarter away from its ends, so steps in memory saved cannot stall it), from the origin while every try saved
    too little; None once a try is within SEARCH_TOLERANCE, MAX_TRIES ran, or no untried level lies between."""
    if len(tries) >= MAX_TRIES or any(abs(t.memory_saved - target) <= SEARCH_TOLERANCE for t in tries):
        return None
    below = max((t for t in tries if t.memory_saved < target), key=lambda t: t.level, default=Try(0.0, 0.0))
    above = min((t for t in tries if t.memory_saved > target), key=lambda t: t.level, default=None)
    if above is None:
        grow = target / below.memory_saved if below.memory_saved > 0 else 2.0
        level = min(1.0, max(below.level * grow, below.level + 0.05))
    elif above.level <= below.level:
        return None  # memory saved fell as the level rose (noise): the closest try stands
    else:
        share = min(max((target - below.memory_saved) / (above.memory_saved - below.memory_saved), 0.25), 0.75)
        level = below.level + share * (above.level - below.level)
    level = round(level, 4)  # a coarse grid, so a try's knob value names its run
    return None if any(math.isclose(level, t.level) for t in tries) else level


def closest(target: float, tries: list[Try]) -> Try:
    return min(tries, key=lambda t: abs(t.memory_saved - target))


def match_gap(spec: PolicySpec, target: float, tries: list[Try]) -> str | None:
    """Why the closest try is more than MATCH_TOLERANCE from `target`; None when it is within."""
    best = closest(target, tries)
    if abs(best.memory_saved - target) <= MATCH_TOLERANCE:
        return None
    top = max(tries, key=lambda t: t.level)
    if best.memory_saved < target and top.level >= 1:
        return f"even {knob_text(spec, top.level)} saves only {top.memory_saved:.1%}"
    below = [t for t in tries if t.memory_saved < target]
    above = [t for t in tries if t.memory_saved > target]
    if below and above:
        low, high = max(below, key=lambda t: t.level), min(above, key=lambda t: t.level)
        return (f"{knob_text(spec, low.level)} saves {low.memory_saved:.1%}, {knob_text(spec, high.level)} "
                f"{high.memory_saved:.1%}: the knob steps over the target")
    return f"{len(tries)} runs came no closer"


def search_match(spec: PolicySpec, target: float, start: float | None, run: Callable[[ShareConfig], R],
                 memory_saved: Callable[[R], float]) -> tuple[R, list[Try]]:
    """Run a matched spec from level `start` (MemShare's affected ratio; None raises) at the levels `next_level`
    gives until its measured memory saved is close to `target`; returns the closest run's result and every try."""
    results: dict[float, R] = {}
    tries: list[Try] = []
    level: float | None = round(start, 4) if start is not None else None
    while True:
        results[level] = run(share_for(spec, level))
        gc.collect()  # an engine holds reference cycles (policy callbacks): free its KV before the next allocates
        tries.append(Try(level, memory_saved(results[level])))
        level = next_level(target, tries)
        if level is None:
            return results[closest(target, tries).level], tries


def run_matched(specs: list[PolicySpec], run: Callable[[PolicySpec, ShareConfig], R],
                memory_saved: Callable[[R], float], affected_ratio: Callable[[R], float]) -> list[R]:
    """`run` each spec in order; a `=memshare` spec is searched (`search_match`) until it saves the memory the last
    MemShare run before it saved."""
    results: list[R] = []
    target, start = 0.0, None
    for spec in specs:
        if spec.match:
            results.append(search_match(spec, target, start, partial(run, spec), memory_saved)[0])
        else:
            results.append(run(spec, spec.share))
            gc.collect()
        if spec.share.policy == "memshare":
            target, start = memory_saved(results[-1]), affected_ratio(results[-1])
    return results
