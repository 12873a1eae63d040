"""Figures: the data drawn (images, nodes, edges, lines, bars) against independent numpy, and files."""

from __future__ import annotations

import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection, PathCollection, PolyCollection

from relkd.graphs import RelationGraph
from relkd.viz import (
    agreement_bars,
    agreement_curves,
    knn_graphs,
    relation_matrices,
    save_figure,
    training_curves,
)

matplotlib.use("Agg")

N, K = 12, 2
LABELS = np.array([2, 0, 1, 2, 0, 1, 1, 0, 2, 2, 0, 1])  # 4 per class, shuffled


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(N, 6, generator=g, dtype=torch.float64)
    s = t[:, :4] + 0.7 * torch.randn(N, 4, generator=g, dtype=torch.float64)
    return s, t


def cosine(x: torch.Tensor) -> np.ndarray:
    u = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    return u @ u.T


def undirected_knn(x: torch.Tensor, k: int) -> set[frozenset[int]]:
    """Pairs {i, j} with j among i's k highest-cosine rows or i among j's."""
    masked = cosine(x) - 10.0 * np.eye(len(x))
    return {frozenset((i, int(j))) for i in range(len(x)) for j in np.argsort(-masked[i])[:k]}


def by_class(labels: np.ndarray) -> list[int]:
    return sorted(range(len(labels)), key=lambda i: (labels[i], i))


def collections(ax, kind):
    return [c for c in ax.collections if isinstance(c, kind)]


# ------------------------------------------------------------------------------ relation matrices
def test_relation_matrices_draws_ordered_teacher_student_difference(pair):
    s, t = pair
    fig = relation_matrices(s, torch.from_numpy(t.numpy()), torch.from_numpy(LABELS))
    assert len(fig.axes) == 5  # three matrices, two colorbars
    ax_t, ax_s, ax_d = fig.axes[:3]
    assert [ax.get_title() for ax in (ax_t, ax_s, ax_d)] == ["Teacher", "Student", "Student − Teacher"]
    order = by_class(LABELS)
    ct, cs = cosine(t)[np.ix_(order, order)], cosine(s)[np.ix_(order, order)]
    np.testing.assert_allclose(ax_t.images[0].get_array(), ct, atol=1e-12)
    np.testing.assert_allclose(ax_s.images[0].get_array(), cs, atol=1e-12)
    np.testing.assert_allclose(ax_d.images[0].get_array(), cs - ct, atol=1e-12)
    assert ax_t.images[0].get_clim() == ax_s.images[0].get_clim()
    lo, hi = ax_d.images[0].get_clim()
    assert lo == -hi


def test_relation_matrices_marks_class_boundaries(pair):
    fig = relation_matrices(*pair, LABELS)
    for ax in fig.axes[:3]:
        positions = sorted(
            {line.get_ydata()[0] for line in ax.lines if line.get_ydata()[0] == line.get_ydata()[1]}
        )
        assert len(ax.lines) == 4  # two boundaries, horizontal and vertical
        assert positions == [3.5, 7.5]
        assert [tick.get_text() for tick in ax.get_xticklabels()] == ["0", "1", "2"]


def test_relation_matrices_class_names_and_labels_from_the_graph(pair):
    s, t = pair
    fig = relation_matrices(
        s, RelationGraph(t, y=torch.from_numpy(LABELS)), class_names=["cat", "dog", "emu"]
    )
    assert [tick.get_text() for tick in fig.axes[0].get_yticklabels()] == ["cat", "dog", "emu"]
    order = by_class(LABELS)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), cosine(t)[np.ix_(order, order)], atol=1e-12)


def test_relation_matrices_without_labels_keeps_batch_order(pair):
    s, t = pair
    fig = relation_matrices(s, t, relation="normalized_distance")
    assert not fig.axes[0].lines
    d = np.linalg.norm(t.numpy()[:, None] - t.numpy()[None], axis=-1)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), d / d[d > 0].mean(), rtol=1e-9)


def test_relation_matrices_passes_kernel_parameters(pair):
    s, t = pair
    fig = relation_matrices(s, t, relation="kernel:rbf", gamma=0.3)
    sq = ((t.numpy()[:, None] - t.numpy()[None]) ** 2).sum(-1)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), np.exp(-0.3 * sq), rtol=1e-9)
    assert "gamma=0.3" in fig.get_suptitle()


def test_relation_matrices_rejects_wrong_label_count(pair):
    with pytest.raises(ValueError, match=f"one label per instance \\({N}\\), got 3"):
        relation_matrices(*pair, labels=[0, 1, 2])


# -------------------------------------------------------------------------------------- kNN graphs
def _segment_pairs(lines: LineCollection, pos: np.ndarray) -> set[frozenset[int]]:
    index = {tuple(p): i for i, p in enumerate(pos)}
    return {frozenset(index[tuple(p)] for p in seg) for seg in lines.get_segments()}


@pytest.mark.parametrize("layout", ["pca", "spring"])
def test_knn_graphs_draws_nodes_and_shared_and_exclusive_edges(pair, layout):
    s, t = pair
    fig = knn_graphs(s, t, LABELS, k=K, layout=layout)
    assert len(fig.axes) == 2
    es, et = undirected_knn(s, K), undirected_knn(t, K)
    assert es & et and es - et and et - es  # the case exercises all three kinds
    expected = {
        "Teacher": {"shared": es & et, "teacher only": et - es},
        "Student": {"shared": es & et, "student only": es - et},
    }
    positions = []
    for ax in fig.axes:
        (nodes,) = collections(ax, PathCollection)
        pos = nodes.get_offsets()
        assert pos.shape == (N, 2)
        positions.append(np.asarray(pos))
        drawn = {lc.get_label(): _segment_pairs(lc, pos) for lc in collections(ax, LineCollection)}
        assert drawn == expected[ax.get_title()]
    np.testing.assert_array_equal(positions[0], positions[1])
    legend_texts = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend_texts == [
        f"shared ({len(es & et)})",
        f"teacher only ({len(et - es)})",
        f"student only ({len(es - et)})",
    ]
    assert [text.get_text() for text in fig.legends[1].get_texts()] == ["0", "1", "2"]


def test_knn_graphs_pca_layout_is_the_teachers_principal_components(pair):
    s, t = pair
    fig = knn_graphs(s, t, k=K)
    pos = np.asarray(collections(fig.axes[0], PathCollection)[0].get_offsets())
    centred = t.numpy() - t.numpy().mean(0)
    u, sv, _ = np.linalg.svd(centred, full_matrices=False)
    scores = u[:, :2] * sv[:2]
    for c in range(2):
        sign = np.sign(pos[:, c] @ scores[:, c])
        np.testing.assert_allclose(pos[:, c], sign * scores[:, c], atol=1e-9)
    assert len(fig.legends) == 1  # no labels: no class legend
    assert fig.axes[0].get_xlabel() == "teacher PC 1"


def test_knn_graphs_unknown_layout(pair):
    with pytest.raises(KeyError, match="Did you mean 'spring'"):
        knn_graphs(*pair, layout="sprin")


# ---------------------------------------------------------------------------- agreement figures
def test_agreement_bars_one_bar_per_method_and_metric():
    metrics = {
        "kd": {"knn_overlap": 0.3, "cka": 0.7, "distance_spearman": 0.5},
        "rkd": {"knn_overlap": 0.4, "cka": 0.8},
    }
    fig = agreement_bars(metrics)
    (ax,) = fig.axes
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 6
    np.testing.assert_array_equal(heights[:3], [0.3, 0.7, 0.5])
    assert heights[3:5] == [0.4, 0.8] and np.isnan(heights[5])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kd", "rkd"]
    labels = [t.get_text() for t in ax.texts]
    assert "0.70" in labels and "nan" not in labels


def test_agreement_curves_one_line_per_metric():
    history = [
        {"epoch": e, "knn_overlap": 0.1 * e, "cka": 0.5 + 0.1 * e, "distance_spearman": 0.2 * e, "lr": 0.1}
        for e in (1, 2, 4)
    ]
    (ax,) = agreement_curves(history).axes
    assert len(ax.lines) == 3
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2, 4])
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.6, 0.7, 0.9])


def test_agreement_curves_needs_agreement_keys():
    with pytest.raises(ValueError, match=r"numeric keys are \['lr'\]"):
        agreement_curves([{"epoch": 1, "lr": 0.1}])


# ------------------------------------------------------------------------------- training curves
def _runs() -> dict[str, list[list[dict]]]:
    seed0 = [
        {"epoch": e, "cka": 0.1 * e, "loss/ce": 2.0 / e, "train_loss": 3.0 / e, "test_acc1": 0.2 * e}
        for e in (1, 2, 3)
    ]
    seed1 = [
        {
            "epoch": e,
            "cka": 0.1 * e + 0.05,
            "loss/ce": 1.0 / e,
            "train_loss": 2.0 / e,
            "test_acc1": 0.2 * e + 0.1,
            "note": "warmup",
            "finished": True,
        }
        for e in (1, 2)
    ]
    other = [{"epoch": e, "test_acc1": 0.15 * e, "train_loss": 1.0} for e in (1, 2, 3)]
    return {"kd": [seed0, seed1], "rkd": [other]}


def test_training_curves_one_panel_per_quantity_accuracy_first():
    fig = training_curves(_runs())
    assert [ax.get_title() for ax in fig.axes] == ["test_acc1", "train_loss", "loss/ce", "cka"]
    assert [len(ax.lines) for ax in fig.axes] == [2, 2, 1, 1]


def test_training_curves_mean_over_seeds_and_minmax_band():
    ax = training_curves(_runs()).axes[0]
    kd = ax.lines[0]
    np.testing.assert_array_equal(kd.get_xdata(), [1, 2, 3])
    # epochs 1, 2 average both seeds; epoch 3 only seed 0 logged it
    np.testing.assert_allclose(kd.get_ydata(), [0.25, 0.45, 0.6])
    (band,) = collections(ax, PolyCollection)  # the one-seed method gets no band
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.2) and ys.max() == pytest.approx(0.6)


def test_training_curves_std_band():
    ax = training_curves(_runs(), keys=["cka"], band="std").axes[0]
    ys = collections(ax, PolyCollection)[0].get_paths()[0].vertices[:, 1]
    # epoch 1: values 0.1, 0.15 -> mean 0.125, sample std 0.05 / sqrt(2)
    assert ys.min() == pytest.approx(0.125 - 0.05 / np.sqrt(2))


def test_training_curves_limits_panels_with_a_warning():
    rows = [[{"epoch": 1, **{f"m{i}": float(i) for i in range(5)}}]]
    with pytest.warns(UserWarning, match=r"dropped \['m3', 'm4'\]"):
        fig = training_curves({"a": rows}, max_panels=3)
    assert len(fig.axes) == 3


def test_training_curves_rejects_unknown_band():
    with pytest.raises(KeyError, match="Did you mean 'std'"):
        training_curves(_runs(), band="sd")


# ------------------------------------------------------------------------------------- saving
def test_save_figure_writes_valid_files(pair, tmp_path):
    fig = agreement_bars({"kd": {"knn_overlap": 0.3, "cka": 0.7, "distance_spearman": 0.5}})
    paths = save_figure(fig, tmp_path / "out" / "bars.png", formats=("png", "svg", "pdf"))
    assert [p.name for p in paths] == ["bars.png", "bars.svg", "bars.pdf"]
    png, svg, pdf = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert b"<svg" in svg[:1000]
    assert pdf.startswith(b"%PDF")


def test_save_figure_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'svg'"):
        save_figure(agreement_curves([{"cka": 0.5}]), tmp_path / "f", formats=("sgv",))


def test_viz_never_imports_pyplot():
    code = "import sys, relkd.viz; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
