"""The demo's picture: kinds ringed, wrong answers kept per step, one bar per step."""

import pytest

pytest.importorskip("matplotlib")

from qtuning_plugin.decision_plots import _kept_by_quadrant, _wrong_kept, plot_decisions  # noqa: E402
from qtuning_plugin.plots import _pyplot  # noqa: E402


def rows():
    out = []
    for step in (1, 2, 3):
        for i in range(8):
            out.append({"step": step, "rank": 0, "id": f"{step}-{i}", "ppl": 2.0 + i + step, "entropy": 1.0 + 0.1 * i,
                        "quadrant": 1 + i % 4, "kept": i < 2, "kept_tokens": 3, "n_tokens": 5,
                        "kind": "wrong" if i in (0, 5) else "garbled" if i == 6 else "useful",
                        "paper_kept": i in (0, 1, 5)})
    return out


def test_steps_are_bars_one_per_step_and_quadrant():
    plt = _pyplot()
    fig, ax = plt.subplots()
    _kept_by_quadrant(ax, rows(), [1, 2, 3])
    bars = [p for p in ax.patches]
    assert len(bars) == 3 * 4  # a stacked bar per step, one segment per quadrant
    heights = {}
    for b in bars:
        heights[round(b.get_x() + b.get_width() / 2)] = heights.get(round(b.get_x() + b.get_width() / 2), 0) + b.get_height()
    assert heights == {1: pytest.approx(100), 2: pytest.approx(100), 3: pytest.approx(100)}
    plt.close(fig)


def test_wrong_answers_kept_per_step_beside_the_paper():
    plt = _pyplot()
    fig, ax = plt.subplots()
    _wrong_kept(ax, rows(), [1, 2, 3])
    seen, kept, paper = (c.datavalues.tolist() for c in ax.containers)
    assert seen == [2, 2, 2] and kept == [1, 1, 1] and paper == [2, 2, 2]
    assert ax.get_title() == "wrong answers kept: 3 of 6 (the paper: 6)"
    plt.close(fig)


def test_a_pool_rings_the_samples_of_known_kinds(tmp_path):
    from qtuning_plugin.plots import draw_pool

    plt = _pyplot()
    fig, ax = plt.subplots()
    pool = [r for r in rows() if r["step"] == 1]
    assert draw_pool(ax, pool)[0] == 8
    ringed = {c.get_label(): len(c.get_offsets()) for c in ax.collections if "(ringed)" in c.get_label()}
    assert ringed == {"wrong answer (ringed)": 2, "garbled answer (ringed)": 1}
    plt.close(fig)
    path = plot_decisions(rows(), tmp_path / "d.png", panels=2)
    assert (tmp_path / "d.png").stat().st_size > 20_000 and path.endswith("d.png")


@pytest.mark.parametrize("field", ["excluded", "surprising", "suspect"])
def test_the_samples_any_rule_kept_out_are_crossed(field):
    """Every rule's decision-log field crosses its samples (drop_surprising's ``surprising`` was
    left out when the picture named the rules' fields by hand)."""
    from qtuning_plugin.decision_log import rule_fields
    from qtuning_plugin.plots import draw_pool

    assert field in rule_fields()
    plt = _pyplot()
    fig, ax = plt.subplots()
    pool = [{**r, field: r["id"].endswith(("-3", "-7"))} for r in rows() if r["step"] == 1]
    draw_pool(ax, pool)
    crossed = {c.get_label(): len(c.get_offsets()) for c in ax.collections if "kept out" in c.get_label()}
    assert crossed == {f"kept out by a rule ({field})": 2}
    plt.close(fig)
