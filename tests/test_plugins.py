"""One's own data, model and loss from a module outside relkd: ``imports:``, ``--import`` and entry
points, through ``relkd run``, ``plot`` and ``viz`` in fresh processes (so nothing registered here leaks
into the other tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import relkd.data as data
import relkd.plugins as plugins

PLUGIN = textwrap.dedent(
    '''
    """A user's module: a data set of arrays, a model and a loss, registered by name."""
    import torch
    from sklearn.datasets import load_digits
    from torch import nn

    import relkd.data as data
    import relkd.losses as L
    import relkd.models as models


    @data.register("digits_half")
    def digits_half(root=None, augment=True):
        raw = load_digits()
        x, y = raw.images.astype("float32") / 16.0, raw.target
        keep = y < 5
        x, y = x[keep], y[keep]
        return data.from_arrays("digits_half", (x[:600], y[:600]), (x[600:], y[600:]), augment=augment)


    @models.register("tiny_mlp")
    def tiny_mlp(num_classes=10, in_shape=(1, 8, 8), width=16):
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU())
        model = nn.Sequential()
        model.body, model.fc = net, nn.Linear(width, num_classes)
        model.default_taps = {"penultimate": "fc:input"}
        return model


    @L.register("mean_match")
    class MeanMatch(L.DistillLoss):
        """Squared difference of the embeddings' batch means (widths may differ: their means are scalars)."""

        def forward(self, student, teacher):
            return (student.mean() - teacher.mean()).pow(2)
    '''
)


def _relkd(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "relkd", "--log-level", "WARNING", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_a_user_module_runs_through_run_plot_and_viz(tmp_path):
    (tmp_path / "my_module.py").write_text(PLUGIN)
    out = tmp_path / "runs" / "mine"
    run = _relkd(
        tmp_path, "run", "imports=[my_module]", "data.name=digits_half", "data.train_subset=50",
        "student.model=tiny_mlp", "teacher.model=tiny_mlp", "teacher.args={width: 32}",
        "methods={baseline: null, mine: {losses: {mean_match: {weight: 1.0}}}}",
        "seeds=[0]", "train.epochs=2", "teacher.train.epochs=3", f"out={out}", "--quiet",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads((out / "mine" / "seed0" / "result.json").read_text())
    rows = [json.loads(line) for line in (out / "mine" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/mean_match" in rows[0] and 0 <= result["last_acc1"] <= 100
    # the run's config.yaml names the module, so the other commands import it too
    plot = _relkd(tmp_path, "plot", str(out))
    assert plot.returncode == 0, plot.stderr
    assert (out / "plots" / "training_curves.png").stat().st_size > 10_000
    viz = _relkd(tmp_path, "viz", str(out), "--method", "mine", "--batch-size", "20", "-k", "3")
    assert viz.returncode == 0, viz.stderr
    assert json.loads((out / "viz" / "agreement.json").read_text())["metrics"]["mine"]


def test_an_unknown_import_is_a_one_line_error(tmp_path):
    run = _relkd(tmp_path, "run", "imports=[not_a_module_here]", "methods=[baseline]")
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "no module named 'not_a_module_here'" in run.stderr
    flag = _relkd(tmp_path, "--import", "also_missing", "list", "losses")
    assert flag.returncode == 1 and flag.stderr.startswith("relkd: error: --import: no module named")


def test_entry_points_are_loaded_once(monkeypatch):
    loaded = []

    class Point:
        name, value = "my_pkg", "my_pkg.plugin"

        def load(self):
            loaded.append(self.name)

    monkeypatch.setattr(plugins, "entry_points", lambda group: [Point()] if group == "relkd.plugins" else [])
    monkeypatch.setattr(plugins, "_loaded", set())
    assert plugins.load_entry_points() == ["my_pkg"]
    assert plugins.load_entry_points() == []
    assert loaded == ["my_pkg"]


def test_from_arrays_normalises_from_the_training_images():
    g = np.random.default_rng(0)
    x_train = g.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)  # channels last
    x_test = g.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    bundle = data.from_arrays("mine", (x_train, np.arange(20) % 4), (x_test, np.arange(5) % 4))
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (4, 3, (6, 6))
    pixels = x_train.astype(np.float64) / 255.0
    assert bundle.mean == pytest.approx(tuple(pixels.mean(axis=(0, 1, 2))), rel=1e-12)
    assert bundle.std == pytest.approx(tuple(pixels.std(axis=(0, 1, 2))), rel=1e-12)
    item = bundle.train[3]
    expected = (pixels[3].transpose(2, 0, 1) - pixels.mean(axis=(0, 1, 2))[:, None, None]) / pixels.std(
        axis=(0, 1, 2)
    )[:, None, None]
    np.testing.assert_allclose(item["input"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert int(item["target"]) == 3


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ((np.full((4, 5, 5), np.nan, dtype=np.float32), np.zeros(4)), "NaN or infinite"),
        ((np.zeros((4, 5, 5)), np.zeros(3)), "expected 4 training labels"),
        ((np.zeros((4, 5, 5)), np.array([0, 1, -1, 0])), "labels must be >= 0"),
        ((np.zeros((4, 5)), np.zeros(4)), r"images must be \[N, H, W\]"),
    ],
)
def test_from_arrays_refuses_bad_input(train, match):
    with pytest.raises(ValueError, match=match):
        data.from_arrays("bad", train, (np.zeros((2, 5, 5)), np.zeros(2)))


def test_nan_pixels_in_a_dataset_are_found_when_it_is_built():
    from relkd.data.tensor_dataset import InMemoryDataset

    images = torch.zeros(6, 1, 2, 2)
    images[4, 0, 1, 1] = float("inf")
    with pytest.raises(
        ValueError, match=r"1 image\(s\) hold NaN or infinite pixel values \(data set indices \[4\]"
    ):
        InMemoryDataset(images, torch.zeros(6), max_value=1.0, mean=(0.0,), std=(1.0,))
