"""Policy specs on the command line: `none,memshare:block_threshold=0.61,h2o:kv_budget=0.8,random:share_ratio=memshare`.

Each comma-separated item is a policy name with optional `:field=value` overrides of ShareConfig fields. The
value `memshare` for `share_ratio` or `kv_budget` means "match the MemShare run listed before this one": the
random policy then shares at its affected ratio, an eviction policy keeps the fraction 1 - affected ratio.
"""

import gc
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TypeVar

from memshare.config import POLICIES, ShareConfig

MATCHABLE = ("share_ratio", "kv_budget")
# The fields worth naming in a run's label, per policy.
LABEL_FIELDS = {"memshare": ("step_threshold", "block_threshold", "stage1", "stage2"), "random": ("share_ratio",),
                "streamingllm": ("kv_budget",), "h2o": ("kv_budget",), "rkv": ("kv_budget",)}


@dataclass(slots=True)
class PolicySpec:
    share: ShareConfig
    match: tuple[str, ...] = ()  # fields to take from the preceding MemShare run

    @property
    def label(self) -> str:
        share = self.share
        parts = [f"{name}={'memshare' if name in self.match else getattr(share, name)}"
                 for name in LABEL_FIELDS.get(share.policy, ())
                 if name in self.match or getattr(share, name) != getattr(ShareConfig(), name)
                 or name in ("step_threshold", "block_threshold", "kv_budget", "share_ratio")]
        return share.policy + (f"({', '.join(parts)})" if parts else "")


def _convert(name: str, raw: str, default: object) -> object:
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        number = float(raw)
        return int(number) if isinstance(default, int) and number.is_integer() else number
    if isinstance(default, tuple):
        return tuple(raw.split("|"))
    return raw


def parse_policies(text: str, defaults: ShareConfig | None = None) -> list[PolicySpec]:
    """PolicySpecs from a comma-separated list; raises ValueError naming the bad item."""
    defaults = defaults or ShareConfig()
    known = {f.name: f for f in fields(ShareConfig)}
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, *overrides = item.split(":")
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r} in {item!r}; choose from {POLICIES}")
        values: dict[str, object] = {"policy": name}
        match: list[str] = []
        for override in overrides:
            key, sep, raw = override.partition("=")
            if not sep or key not in known or key == "policy":
                raise ValueError(f"bad override {override!r} in {item!r}: use field=value with a ShareConfig field")
            if raw == "memshare" and key in MATCHABLE:
                match.append(key)
                continue
            try:
                values[key] = _convert(key, raw, getattr(defaults, key))
            except ValueError as error:
                raise ValueError(f"bad value for {key} in {item!r}: {raw!r}") from error
        specs.append(PolicySpec(replace(defaults, **values), tuple(match)))
    if not specs:
        raise ValueError("no policy given")
    return specs


def parse_sweep(items: list[str] | None) -> dict[str, list[str]]:
    """`["block_threshold=0.62,0.55,0.5", ...]` -> {field: values}; every field needs as many values."""
    known = {f.name for f in fields(ShareConfig)}
    sweep: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not sep or key not in known or key == "policy" or not values:
            raise ValueError(f"bad --sweep {item!r}: use field=v1,v2,... with a ShareConfig field")
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
    defaults = ShareConfig()
    expanded: list[tuple[PolicySpec, PolicySpec | None]] = []  # (spec, the MemShare spec it is matched to)
    for level in range(len(next(iter(sweep.values())))):
        source: PolicySpec | None = None
        for spec in specs:
            values = {k: _convert(k, v[level], getattr(defaults, k)) for k, v in sweep.items()
                      if k in LABEL_FIELDS.get(spec.share.policy, ()) and k not in spec.match}
            try:
                swept = PolicySpec(replace(spec.share, **values), spec.match)
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
    values: dict[str, float] = {}
    if "share_ratio" in spec.match:
        values["share_ratio"] = memshare_affected_ratio
    if "kv_budget" in spec.match:
        values["kv_budget"] = min(max(1 - memshare_affected_ratio, 1e-3), 0.999)
    return replace(spec.share, **values)


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
