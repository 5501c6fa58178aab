"""The figures of a run: one colour per policy in all of them, percent and integer axes, a KL of 0 at a tick
labelled 0, a labelled KV capacity, and a minimum span around a single point."""

from types import SimpleNamespace

from matplotlib.colors import to_hex

from memshare import ShareConfig, share_config
from memshare.eval.bench import bench_figure
from memshare.eval.compare import compare_figure
from memshare.eval.fidelity import PolicyFidelity, TraceFidelity, fidelity_figures
from memshare.eval.plots import PERCENT_SPAN, policy_color, series_styles
from memshare.eval.report import accuracy_vs_memory_figure, replay_figures

MEMSHARE = share_config("memshare", block_threshold=0.6)
H2O = share_config("h2o", kv_budget=0.5)
HISTORY = [(0.0, 10, 10, 1), (1.0, 30, 40, 2), (2.0, 45, 60, 3)]  # (engine s, physical, logical, batch)


def replay_run(name: str, share: ShareConfig, kl: float | None, saved: float, matched: str | None = None) -> dict:
    config = {"share": share.to_dict(), "engine": {}} | ({"matched": {"memshare_run": matched}} if matched else {})
    return {"name": name, "policy": share.policy, "config": config,
            "summary": {"kl": kl, "output_tokens_per_s": 10 * (1 + saved), "kv_bytes_saved_vs_float32": saved,
                        "sessions": [{"num_kv_blocks": 64, "kv_history": HISTORY}]}}


def eval_run(name: str, share: ShareConfig, saved: float) -> dict:
    return {"name": name, "policy": share.policy, "config": {"share": share.to_dict()},
            "summary": {"memory_saved_mean": saved},
            "score": {"pass@1": 0.5, "ci_low": 0.4, "ci_high": 0.6, "affected_ratio": 0.2}}


def engine_result(label: str, share: ShareConfig) -> SimpleNamespace:
    return SimpleNamespace(label=label, share=share.to_dict(), stats={"num_kv_blocks": 64}, kv_history=HISTORY)


def fidelity_result(label: str, share: ShareConfig, kl: float) -> PolicyFidelity:
    trace = TraceFidelity("t", kl=[0.0, kl], top1=[True, False], first_affected=1, share_similarities=[0.8])
    stats = {"affected_ratio": 0.5, "memory_saved_mean": 0.0176, "memory_saved_peak": 0.03, "blocks_shared": 1}
    return PolicyFidelity(label, share.to_dict(), [trace], stats)


def line_colors(ax) -> dict[str, str]:
    lines = {line.get_label(): line.get_color() for line in ax.lines}
    lines |= {c.get_label(): c.lines[0].get_color() for c in ax.containers if hasattr(c, "lines")}
    return {label: to_hex(color) for label, color in lines.items()}


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def replay() -> tuple:
    dense = replay_run("none", ShareConfig(), None, 0.0)
    runs = [dense, replay_run("ms", MEMSHARE, 0.0176, 0.0176), replay_run("h2o", H2O, 0.0, 0.0176, matched="ms")]
    figures = replay_figures("t", runs, dense)
    (kl_ax, speed_ax), (batch_ax, blocks_ax) = figures["kl_throughput_vs_memory"].axes[:2], figures["batch_kv"].axes
    return kl_ax, speed_ax, batch_ax, blocks_ax


def test_a_policy_has_one_colour_in_every_figure():
    kl_ax, speed_ax, batch_ax, _ = replay()
    bench = bench_figure([engine_result("none", ShareConfig()), engine_result("memshare(x)", MEMSHARE)], "b").axes[0]
    compare = compare_figure([engine_result("dense", ShareConfig()), engine_result("ms 0.6", MEMSHARE)], "c").axes
    fidelity = fidelity_figures([fidelity_result("memshare(x)", MEMSHARE, 0.1)], "f")
    accuracy = accuracy_vs_memory_figure("a", [eval_run("ms", MEMSHARE, 0.1), eval_run("h2o", H2O, 0.2)]).axes[0]
    memshare, h2o, dense = (to_hex(policy_color(p)) for p in ("memshare", "h2o", "none"))
    assert len({memshare, h2o, dense}) == 3
    for ax, label in ((kl_ax, "memshare"), (speed_ax, "memshare"), (batch_ax, "memshare"), (accuracy, "memshare"),
                      (bench, "memshare(x)"), (compare[0], "ms 0.6"), (compare[1], "ms 0.6"),
                      (fidelity["fidelity_kl_vs_memory.png"].axes[0], "memshare"),
                      (fidelity["fidelity_kl_vs_similarity.png"].axes[0], "memshare(x)")):
        assert line_colors(ax)[label] == memshare, (ax.get_title(), label)
    for ax in (kl_ax, batch_ax, accuracy):
        assert line_colors(ax)["h2o"] == h2o
    assert line_colors(batch_ax)["none"] == line_colors(bench)["none"] == line_colors(compare[0])["dense"] == dense
    assert {to_hex(p.get_facecolor()) for p in fidelity["fidelity.png"].axes[0].patches} == {memshare}


def test_variants_of_a_policy_keep_its_colour_and_differ_in_style():
    styles = series_styles([("memshare", "memshare"), ("memshare [int8]", "memshare"), ("h2o", "h2o")])
    assert styles["memshare"]["color"] == styles["memshare [int8]"]["color"] != styles["h2o"]["color"]
    assert styles["memshare"]["linestyle"] != styles["memshare [int8]"]["linestyle"]
    variants = series_styles([(str(k), "memshare") for k in range(16)])
    assert len({tuple(sorted(s.items())) for s in variants.values()}) == 16


def test_kl_of_zero_sits_at_a_tick_labelled_zero():
    kl_ax, *_ = replay()
    h2o = next(line for line in kl_ax.lines if line.get_label() == "h2o")
    assert list(h2o.get_ydata()) == [0.0]  # drawn at 0, not at 1e-6
    assert 0.0 in kl_ax.get_yticks() and kl_ax.yaxis.get_major_formatter()(0.0, 0) == "0"
    ax = fidelity_figures([fidelity_result("memshare(x)", MEMSHARE, 0.0)], "f")["fidelity_kl_vs_memory.png"].axes[0]
    assert ax.get_yscale() == "symlog" and ax.yaxis.get_major_formatter()(0.0, 0) == "0"


def test_memory_saved_is_percent_and_one_point_gets_a_minimum_span():
    kl_ax, speed_ax, *_ = replay()
    accuracy = accuracy_vs_memory_figure("a", [eval_run("ms", MEMSHARE, 0.0176)]).axes[0]
    memory = fidelity_figures([fidelity_result("memshare(x)", MEMSHARE, 0.1)], "f")["fidelity_kl_vs_memory.png"]
    saved = compare_figure([engine_result("ms", MEMSHARE)], "c").axes[1]
    for axis in (kl_ax.xaxis, speed_ax.xaxis, accuracy.xaxis, accuracy.yaxis, memory.axes[0].xaxis, saved.yaxis):
        assert axis.get_major_formatter()(0.25, 0) == "25%" and axis.get_major_formatter()(0.025, 0) == "2.5%"
    for axis in (kl_ax.xaxis, speed_ax.xaxis, accuracy.xaxis, memory.axes[0].xaxis):  # one point at 1.76%
        low, high = axis.get_view_interval()
        assert high - low >= PERCENT_SPAN - 1e-12 and low >= 0, (low, high)
    low, high = speed_ax.get_ylim()
    assert high - low >= 0.2 - 1e-12


def test_counts_have_integer_ticks_and_the_capacity_is_labelled():
    _, _, batch_ax, blocks_ax = replay()
    bench = bench_figure([engine_result("memshare(x)", MEMSHARE)], "b").axes[0]
    for ax in (batch_ax, blocks_ax, bench):
        assert all(float(t).is_integer() for t in ax.get_yticks())
    assert "KV capacity (64 blocks)" in legend_texts(blocks_ax) and "KV capacity (64 blocks)" in legend_texts(bench)
    assert set(legend_texts(batch_ax)) == {"none", "memshare", "h2o"}
