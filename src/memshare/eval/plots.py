"""What every figure of a run shares: one colour per policy, percent and integer axes, a KL axis that shows 0,
labelled KV capacity lines, and a minimum axis span so one point does not zoom into noise."""

import math
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from memshare.config import policy_names

# tab10 without its grey, which the reference lines (capacity, KL 0.05, dense) use.
PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # with LINESTYLES: 8 variants of a policy look apart
PERCENT_SPAN = 0.05  # a memory-saved or pass@1 axis spans at least 5 percentage points


def policy_color(policy: str) -> str:
    """The colour of `policy` in every figure: registered policies by registration order, others by name hash."""
    names = policy_names()
    return PALETTE[(names.index(policy) if policy in names else zlib.crc32(policy.encode())) % len(PALETTE)]


def series_styles(series: Iterable[tuple[str, str]], markers: bool = True) -> dict[str, dict[str, Any]]:
    """Plot keywords per (series name, policy): the policy's colour, and per variant of a policy, in order of first
    appearance, its own line style (and marker)."""
    styles: dict[str, dict[str, Any]] = {}
    variants: Counter[str] = Counter()
    for name, policy in series:
        if name not in styles:
            k = variants[policy]
            variants[policy] += 1
            styles[name] = {"color": policy_color(policy), "linestyle": LINESTYLES[k % len(LINESTYLES)]}
            if markers:
                styles[name]["marker"] = MARKERS[k % len(MARKERS)]
                if k // len(MARKERS) % 2:  # the next 8 variants: hollow markers
                    styles[name]["markerfacecolor"] = "none"
    return styles


def new_figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (8, 4.5),
               **subplots: Any) -> tuple[Figure, Any]:
    """A figure outside pyplot's registry (nothing to close) and its axes: one Axes, else a 2-d array."""
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=rows * cols == 1, **subplots)


def save_figure(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=120)


def _percent(value: float, _position: int) -> str:
    return f"{round(100 * value, 6):g}%"  # 50%, 2.5%: no fixed decimals


def percent_axis(axis: Any) -> None:
    axis.set_major_formatter(FuncFormatter(_percent))


def count_axis(axis: Any) -> None:
    axis.set_major_locator(MaxNLocator(integer=True))


def min_span(ax: Axes, axis: str, span: float, bounds: tuple[float, float] = (0.0, math.inf)) -> None:
    """Widen the x or y limits of `ax` to at least `span` around the data, inside `bounds` if the data are."""
    get, set_ = (ax.get_xlim, ax.set_xlim) if axis == "x" else (ax.get_ylim, ax.set_ylim)
    low, high = get()
    if high - low < span:
        start = (low + high - span) / 2
        if bounds[0] <= low and high <= bounds[1]:
            start = min(max(start, bounds[0]), bounds[1] - span)
        set_(start, start + span)


def _kl_tick(value: float, _position: int) -> str:
    if value == 0:
        return "0"
    return f"{value:g}" if value >= 1e-3 else f"{value:.0e}".replace("e-0", "e-")


def kl_axis(ax: Axes, values: Iterable[float]) -> None:
    """A symlog y axis for KL: log above the decade of the smallest positive KL, linear below it, so a KL of 0 sits
    at a tick labelled 0; the top is the decade above the largest KL."""
    positive = [v for v in values if v > 0]
    linthresh = 10.0 ** math.floor(math.log10(min(positive))) if positive else 1e-3
    ax.set_yscale("symlog", linthresh=linthresh, linscale=0.5)
    # a little below 0, so a marker at 0 is not cut in half
    ax.set_ylim(-0.2 * linthresh, 10.0 ** math.ceil(math.log10(max(positive)) + 0.01) if positive else 10 * linthresh)
    ax.yaxis.set_major_formatter(FuncFormatter(_kl_tick))


def capacity_lines(ax: Axes, capacities: Iterable[tuple[int, str]]) -> None:
    """A labelled grey line per distinct KV capacity in blocks, given with the KV dtype of each run; the dtypes are
    named only when capacities differ (equal bytes hold more blocks of a smaller dtype)."""
    dtypes: dict[int, dict[str, None]] = {}  # ordered sets
    for blocks, dtype in capacities:
        dtypes.setdefault(blocks, {})[dtype] = None
    for k, (blocks, names) in enumerate(dtypes.items()):
        named = f", {' / '.join(names)}" if len(dtypes) > 1 else ""
        ax.axhline(blocks, color="grey", linestyle=(":", "-.", "--")[k % 3], linewidth=1,
                   label=f"KV capacity ({blocks} blocks{named})")
