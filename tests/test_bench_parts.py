"""The harness's parts on their own: interleaved timing and ratio spreads, what the CPU profile
counts as a kernel, log-axis ticks and the width axis of the sweep plots."""
import matplotlib.pyplot as plt
import pytest
import torch

from bench import plots, profile, sweep, timing


def test_interleaved_keeps_timing_without_a_failing_step():
    calls = {"ok": 0, "bad": 0}

    def ok():
        calls["ok"] += 1

    def bad():
        calls["bad"] += 1
        if calls["bad"] == 3:
            raise RuntimeError("out of memory, say")
    times, errors = timing.interleaved({"ok": ok, "bad": bad}, torch.device("cpu"), warmup_ms=0, rep_ms=0,
                                       min_reps=7)
    assert list(times) == ["ok"] and len(times["ok"]) == 7 and str(errors["bad"]) == "out of memory, say"


def test_ratio_is_taken_round_by_round():
    # The baseline's slow rounds are the fused one's slow rounds: per round the ratio is 2 throughout.
    slow, fast = [2.0, 20.0, 2.0, 20.0, 2.0], [1.0, 10.0, 1.0, 10.0, 1.0]
    assert timing.ratio(slow, fast) == {"median": 2.0, "q20": 2.0, "q80": 2.0}
    assert sweep.ratio_text(timing.ratio([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)) == "3.00±1.20"  # q20 1.8, q80 4.2
    assert sweep.ratio_text(None) == "n/a"


@pytest.mark.parametrize("name,kernel", [("aten::addmm", True), ("aten::mm", True), ("aten::native_batch_norm", True),
                                         ("aten::copy_", True), ("aten::add_", True), ("aten::linear", False),
                                         ("aten::batch_norm", False), ("aten::t", False), ("aten::view", False),
                                         ("aten::empty", False), ("autograd::engine::evaluate_function", False)])
def test_cpu_profile_counts_ops_that_do_work(name, kernel):
    assert profile.does_work(name) is kernel


@pytest.mark.parametrize("lo,hi", [(1.2e5, 3e5), (1e3, 1e6), (1.0, 1.05), (3.1e4, 3.9e4), (0.8, 40.0)])
def test_log_axes_get_enough_labels(lo, hi):
    ticks = plots.log_ticks(lo, hi)
    assert len(ticks) >= 2 and all(lo <= t <= hi for t in ticks)


def test_plots_show_width_of_each_depth():
    fig, ax = plt.subplots()
    recs = [{"depth": 1, "width": 758}, {"depth": 4, "width": 161}, {"depth": 16, "width": 75}]
    ax.plot([1, 4, 16], [3e4, 2e4, 1e4])
    plots._depth_axis(ax, recs)
    (top,) = ax.child_axes
    fig.canvas.draw()
    assert [t.get_text() for t in top.get_xticklabels()] == ["758", "161", "75"]
    plt.close(fig)


def test_compiled_siblings_compile_once():
    """Two compiled implementations of one configuration compile once each: building the second
    must not send the first back to the compiler inside the timed loop."""
    from torch._dynamo.utils import counters
    from bench import models
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = models.reference_model(128, 2e4, 1, 1, 0, torch.device("cpu"))
        x, target = torch.randn(32, 128), torch.randn(32, 1)
        before = counters["stats"]["unique_graphs"]
        recs = sweep.measure(["compile", "compile-max-autotune"], reference, "infer", "fp32", x, target, 1.0, 5.0,
                             "cpu")
    finally:
        torch.set_num_threads(threads)
    assert [r["status"] for r in recs] == ["ok", "ok"]
    assert counters["stats"]["unique_graphs"] - before == 2
