"""The shift_scale evaluator: translations and zooms against hand-computed images and a written-out
bilinear reference, the fill values, its accuracies on a network that is a known function of the
image, its registration and its errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from relkd.evaluation import EVALUATORS, EvalContext, build_evaluator
from relkd.evaluation.shift import ShiftScale, rescale, shift_scale_accuracy, translate

torch.set_num_threads(1)


def grid(h: int, w: int) -> torch.Tensor:
    """The image ``I[y, x] = w * y + x`` as ``[1, 1, h, w]`` float64."""
    return torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)


# --- translations, by hand -----------------------------------------------------------------------


def test_translate_by_hand_on_a_3x3_image():
    x = grid(3, 3)  # [[0 1 2] [3 4 5] [6 7 8]]
    right = [[-1, 0, 1], [-1, 3, 4], [-1, 6, 7]]
    up = [[3, 4, 5], [6, 7, 8], [-1, -1, -1]]
    left_down = [[-1, -1, -1], [1, 2, -1], [4, 5, -1]]
    assert translate(x, 1, 0, -1.0)[0, 0].tolist() == right
    assert translate(x, 0, -1, -1.0)[0, 0].tolist() == up
    assert translate(x, -1, 1, -1.0)[0, 0].tolist() == left_down
    assert torch.equal(translate(x, 0, 0, -1.0), x)
    assert translate(x, 3, 0, 7.0)[0, 0].tolist() == [[7.0] * 3] * 3  # moved out entirely


def test_translate_fills_each_channel_and_each_image_with_its_own_value():
    x = torch.zeros(2, 2, 2, 2)
    per_channel = translate(x, 1, 0, torch.tensor([5.0, 6.0]))
    assert per_channel[:, 0, :, 0].eq(5).all() and per_channel[:, 1, :, 0].eq(6).all()
    assert per_channel[..., 1].eq(0).all()
    per_image = translate(x, 0, 1, torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 2, 1, 1))
    assert per_image[0, :, 0].eq(1).all() and per_image[1, :, 0].eq(2).all()


# --- zooms: closed forms and a written-out bilinear reference --------------------------------------


def close(actual: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def reference_zoom(image: list[list[float]], factor: float, fill: float) -> list[list[float]]:
    """Bilinear sampling of ``image`` at ``c + (p - c) / factor`` (pixel centres), every pixel outside
    the image worth ``fill``: the textbook four-neighbour formula, in float64."""
    h, w = len(image), len(image[0])

    def at(y: int, x: int) -> float:
        return image[y][x] if 0 <= y < h and 0 <= x < w else fill

    out = []
    for i in range(h):
        row = []
        for j in range(w):
            u = (h - 1) / 2 + (i - (h - 1) / 2) / factor
            v = (w - 1) / 2 + (j - (w - 1) / 2) / factor
            y0, x0 = math.floor(u), math.floor(v)
            fy, fx = u - y0, v - x0
            row.append(
                (1 - fy) * (1 - fx) * at(y0, x0)
                + (1 - fy) * fx * at(y0, x0 + 1)
                + fy * (1 - fx) * at(y0 + 1, x0)
                + fy * fx * at(y0 + 1, x0 + 1)
            )
        out.append(row)
    return out


def test_zoom_by_2_samples_a_linear_image_exactly():
    # Centre 1.5: rows and columns are read at 0.75, 1.25, 1.75, 2.25; bilinear interpolation of the
    # linear image 4y + x is exact there.
    u = [0.75, 1.25, 1.75, 2.25]
    expected = [[4 * a + b for b in u] for a in u]
    close(rescale(grid(4, 4), 2.0, fill=-9.0)[0, 0], expected)


def test_zoom_by_one_half_reads_the_fill_outside():
    # Read at -1.5, 0.5, 2.5, 4.5: the first and last rows and columns lie outside the image.
    f, u = -9.0, [-1.5, 0.5, 2.5, 4.5]
    expected = [[4 * u[i] + u[j] if i in (1, 2) and j in (1, 2) else f for j in range(4)] for i in range(4)]
    close(rescale(grid(4, 4), 0.5, fill=f)[0, 0], expected)


@pytest.mark.parametrize("factor", [0.75, 0.8, 1.0, 1.2, 1.7])
def test_zoom_matches_the_written_out_bilinear_reference(factor):
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 1, 5, 6, generator=g, dtype=torch.float64)
    expected = reference_zoom(image[0, 0].tolist(), factor, fill=-0.5)
    close(rescale(image, factor, fill=-0.5)[0, 0], expected)


def test_zoom_by_one_is_the_identity():
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(rescale(x, 1.0, 0.0), x, rtol=0, atol=1e-12)


# --- the evaluator on a known function --------------------------------------------------------------


class ColumnOfBrightest(nn.Module):
    """Logits = the column sums of a 1-channel image: the predicted class is the brightest column."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the module a device
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x[:, 0].sum(dim=1) + self.anchor


def dots(positions: list[tuple[int, int]], size: int = 10) -> dict[str, torch.Tensor]:
    """Images with one pixel of 1 at (row, column); the label is the column."""
    x = torch.zeros(len(positions), 1, size, size)
    for b, (r, c) in enumerate(positions):
        x[b, 0, r, c] = 1.0
    return {
        "input": x,
        "target": torch.tensor([c for _, c in positions]),
        "index": torch.arange(len(positions)),
    }


# Ten images: columns 0..9, rows 0, 9, 3, 3, 5, 9, 2, 0, 7, 9.
ROWS = [0, 9, 3, 3, 5, 9, 2, 0, 7, 9]
LOADER = [dots([(r, c) for c, r in enumerate(ROWS[:6])]), dots([(r, c + 6) for c, r in enumerate(ROWS[6:])])]


def test_accuracy_per_transform_of_a_known_function():
    model = ColumnOfBrightest().train()
    out = shift_scale_accuracy(
        model, LOADER, translations=[[1, 0], [0, 1], [0, -1], [-2, 0]], scales=[1.0], fill=0.0
    )
    # Right by one: every prediction is one column off (column 9 leaves the image: all zeros, argmax 0).
    assert out["dx1_dy0"] == 0.0
    # Down by one: the column stays, except rows 9 leave the image (columns 1, 5, 9): an all-zero image is
    # classed 0, wrong for all three. Up by one: rows 0 leave (columns 0 and 7); column 0 is still right.
    assert out["dx0_dy1"] == pytest.approx(70.0)
    assert out["dx0_dy-1"] == pytest.approx(90.0)
    # Left by two: columns 0 and 1 leave and are classed 0: only column 0 is right.
    assert out["dx-2_dy0"] == pytest.approx(10.0)
    assert out["scale1"] == 100.0
    assert out["mean"] == pytest.approx((0 + 70 + 90 + 10 + 100) / 5)
    assert model.modes and not any(model.modes) and model.training  # eval mode inside, restored after


def test_the_evaluator_reads_the_test_loader_and_fills_with_the_normalised_black():
    seen = []

    class Recorder(ColumnOfBrightest):
        def forward(self, x):
            seen.append(x.clone())
            return super().forward(x)

    batches = [dots([(4, 4)])]

    class Loader(list):
        dataset = SimpleNamespace(mean=(0.5,), std=(0.25,))

    model = Recorder()
    ctx = EvalContext("student", {"student": model}, {"test": Loader(batches)}, torch.device("cpu"))
    out = build_evaluator("shift_scale", {"translations": [[1, 0]], "scales": []})(ctx)
    assert set(out) == {"dx1_dy0", "mean"}
    assert seen[0][0, 0, :, 0].eq(-2.0).all()  # (0 - 0.5) / 0.25
    assert seen[0][0, 0, 4, 5] == 1.0
    with pytest.raises(ValueError, match="fill 'black' needs the test set's normalisation"):
        shift_scale_accuracy(model, batches, [[1, 0]], [])
    dark = dots([(4, 4)])
    dark["input"] = dark["input"] - 3.0  # background -3, the dot -2
    minimum = shift_scale_accuracy(model, [dark], [[1, 0]], [], "min")
    assert minimum["dx1_dy0"] == 0.0 and seen[-1][0, 0, :, 0].eq(-3.0).all()


def test_registered_with_its_defaults():
    assert EVALUATORS.get("shift_scale") is ShiftScale
    evaluator = ShiftScale()
    assert evaluator.translations == [(2, 0), (-2, 0), (0, 2), (0, -2)]
    assert evaluator.scales == [0.8, 1.2] and evaluator.fill == "black"


def test_bad_options_raise():
    with pytest.raises(ValueError, match=r"pair of whole pixels \[dx, dy\], got \(1, 2, 3\)"):
        ShiftScale(translations=[(1, 2, 3)])
    with pytest.raises(ValueError, match="pair of whole pixels"):
        ShiftScale(translations=[(0.5, 0)])
    with pytest.raises(ValueError, match="scale factors must be positive, got 0"):
        ShiftScale(scales=[0])
    with pytest.raises(ValueError, match="at least one translation or scale"):
        ShiftScale(translations=[], scales=[])
    with pytest.raises(ValueError, match="fill must be 'black', 'min' or a number, got 'white'"):
        ShiftScale(fill="white")
    with pytest.raises(ValueError, match="listed twice"):
        ShiftScale(translations=[(1, 0), (1, 0)])
    with pytest.raises(ValueError, match="expected images"):
        translate(torch.zeros(3, 3), 1, 0)
    with pytest.raises(ValueError, match="whole pixels"):
        translate(torch.zeros(1, 1, 3, 3), 0.5, 0)
    with pytest.raises(ValueError, match="must be positive"):
        rescale(torch.zeros(1, 1, 3, 3), -1.0)
    with pytest.raises(ValueError, match="yielded no image"):
        shift_scale_accuracy(ColumnOfBrightest(), [], [[1, 0]], [], 0.0)
