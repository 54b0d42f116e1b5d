"""pyro_flowpack.plots: every picture is a valid PNG of a plausible size, the heat map
is the density, flows keep their train/eval mode, bad shapes raise clear errors, and
files are written atomically."""

import math
import os
import subprocess
import sys

import matplotlib.image
import pytest
import torch
from matplotlib.figure import Figure

import pyro_flowpack as pf
from pyro_flowpack import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    """The picture as an (H, W, 4) float array, after checking the PNG signature."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    picture = matplotlib.image.imread(path, format="png")
    assert picture.ndim == 3 and picture.shape[2] in (3, 4)
    return picture


def loss_records(steps=200):
    records = [{"step": s, "train_loss": 1.0 + 4.0 * math.exp(-s / 30), "lr": 1e-3} for s in range(steps)]
    records += [{"step": s, "valid_loss": 1.2 + 4.0 * math.exp(-s / 30)} for s in range(0, steps, 50)]
    return records


@pytest.mark.parametrize(
    "records",
    [
        loss_records(),
        loss_records() + [{"step": 5, "train_loss": float("nan")}, {"step": 6, "train_loss": float("inf")},
                          {"step": 7, "valid_loss": None}, {"step": 8, "train_loss": "n/a"}],
        [{"step": 0, "train_loss": 2.5}],
        [{"step": 0, "valid_loss": 2.5}],
        [{"step": 0, "train_loss": float("nan")}],
        [],
    ],
    ids=["curves", "nan-inf-none", "single-train", "single-valid", "only-nan", "empty"],
)
def test_loss_curve_writes_a_png_for_any_log(tmp_path, records):
    path = plots.loss_curve(records, tmp_path / "loss.png", unit="bits/dim")
    assert path == tmp_path / "loss.png"
    assert read_png(path).shape[:2] == (400, 640)  # 6.4 x 4 inches at 100 dpi


def test_loss_curve_clips_the_first_steps_and_skips_non_finite(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure))
    records = loss_records()
    records[0]["train_loss"] = 1e4  # a huge first loss must not flatten the curve
    records[1]["train_loss"] = float("inf")
    plots.loss_curve(records, tmp_path / "loss.png")
    axes = figures[0].axes[0]
    low, high = axes.get_ylim()
    assert high < 6.0 and low < 1.1  # all but the top 2% of the values (1.0 .. 5.2) in view
    train = axes.lines[0].get_ydata()
    assert len(train) == 199 and all(math.isfinite(v) for v in train)
    assert axes.get_ylabel() == "negative log-likelihood (nats)"


def test_density_grid_of_a_standard_normal_integrates_to_one_and_peaks_at_zero():
    normal = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    xs, ys, values = plots.density_grid(normal.log_prob, ((-6.0, 6.0), (-6.0, 6.0)), grid=101)
    assert xs.shape == ys.shape == (101,) and values.shape == (101, 101)
    cell = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
    assert float(values.sum()) * cell == pytest.approx(1.0, abs=1e-3)  # midpoint rule error ~1e-4
    i, j = divmod(int(values.argmax()), 101)
    assert float(xs[j]) == pytest.approx(0.0, abs=1e-9) and float(ys[i]) == pytest.approx(0.0, abs=1e-9)
    assert float(values.max()) == pytest.approx(1 / (2 * math.pi), rel=1e-6)


def test_density_grid_rows_are_y_and_columns_are_x():
    mean = torch.tensor([1.5, -2.0])
    normal = torch.distributions.MultivariateNormal(mean, 0.1 * torch.eye(2))
    xs, ys, values = plots.density_grid(normal.log_prob, ((-4.0, 4.0), (-3.0, 3.0)), grid=80)
    i, j = divmod(int(values.argmax()), 80)
    cell_x, cell_y = 8.0 / 80, 6.0 / 80
    assert abs(float(xs[j]) - 1.5) <= cell_x / 2 + 1e-9 and abs(float(ys[i]) + 2.0) <= cell_y / 2 + 1e-9
    point = torch.tensor([[float(xs[7]), float(ys[3])]])
    assert float(values[3, 7]) == pytest.approx(float(normal.log_prob(point).exp()), rel=1e-5)


def test_density_grid_shows_non_finite_log_densities_as_zero():
    def log_prob(points):
        out = -points.pow(2).sum(-1)
        out[0], out[1] = float("nan"), float("inf")
        return out

    _, _, values = plots.density_grid(log_prob, 3.0, grid=10)
    assert torch.isfinite(values).all() and float(values[0, 0]) == 0.0 and float(values[0, 1]) == 0.0


@pytest.mark.parametrize("training", [True, False])
def test_density_2d_evaluates_in_eval_mode_and_restores_the_mode(tmp_path, training):
    flow = pf.flows.RealNVP(features=2, transforms=2, hidden=(8,))
    flow.train(training)
    seen = []
    flow.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    path = plots.density_2d(flow, torch.randn(300, 2), tmp_path / "density.png", grid=30)
    assert seen == [False]
    assert flow.training is training and all(m.training is training for m in flow.modules())
    assert read_png(path).shape[:2] == (450, 1350)  # 13.5 x 4.5 inches at 100 dpi
    assert all(p.grad is None for p in flow.parameters())


def test_density_2d_with_many_points_a_conditional_flow_and_a_log_density_function(tmp_path):
    data = torch.randn(2500, 2)  # histogram panels
    flow = pf.flows.MAF(features=2, context=3, transforms=2, hidden=(8,))
    read_png(plots.density_2d(flow, data, tmp_path / "conditional.png", grid=20, context=torch.randn(3)))
    normal = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
    path = plots.density_2d(normal.log_prob, data, tmp_path / "function.png", samples=torch.randn(100, 2),
                            bounds=((-3, 3), (-2, 2)), grid=20)
    read_png(path)


def test_density_2d_rejects_bad_input(tmp_path):
    flow = pf.flows.RealNVP(features=2, transforms=2, hidden=(8,))
    with pytest.raises(ValueError, match=r"data must have shape \(N, 2\), got \(10, 3\)"):
        plots.density_2d(flow, torch.randn(10, 3), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 2\), got \(10,\)"):
        plots.density_2d(flow, torch.randn(10, 2), tmp_path / "x.png", samples=torch.randn(10))
    with pytest.raises(ValueError, match="pass samples="):
        plots.density_2d(lambda x: -x.pow(2).sum(-1), torch.randn(10, 2), tmp_path / "x.png")
    with pytest.raises(ValueError, match="bounds must be"):
        plots.density_2d(flow, torch.randn(10, 2), tmp_path / "x.png", bounds=((1, 0), (0, 1)))
    assert flow.training and not list(tmp_path.iterdir())


def test_image_grid_scales_levels_and_enlarges_small_images(tmp_path):
    images = torch.zeros(10, 1, 8, 8, dtype=torch.long)
    images[0] = 16  # the brightest level of 17
    images[1, :, :, :4] = 8
    picture = read_png(plots.image_grid(images, tmp_path / "grid.png", num_bins=17))
    # 4 columns x 3 rows of 8x8 tiles with 1-pixel gaps, enlarged 8 times (nearest)
    assert picture.shape[:2] == ((3 * 9 + 1) * 8, (4 * 9 + 1) * 8)
    grey = picture[..., 0]
    assert grey[8 + 30, 8 + 30] == pytest.approx(1.0, abs=1e-6)  # inside tile 0: white
    assert grey[8 + 30, 80 + 10] == pytest.approx(0.5, abs=2 / 255)  # tile 1, left half: level 8 of 16
    assert grey[8 + 30, 80 + 50] == pytest.approx(0.0, abs=1e-6)  # tile 1, right half: black


def test_image_grid_rgb_floats_uint8_and_nrow(tmp_path):
    picture = read_png(plots.image_grid(torch.rand(6, 3, 32, 32), tmp_path / "rgb.png", nrow=6))
    assert picture.shape[:2] == (34 * 2, (6 * 33 + 1) * 2)
    uint8 = torch.full((4, 1, 28, 28), 255, dtype=torch.uint8)
    assert read_png(plots.image_grid(uint8, tmp_path / "uint8.png"))[30, 30, 0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("images", "kwargs", "message"),
    [
        (torch.rand(4, 8, 8), {}, r"\(N, C, H, W\) with C = 1 or 3, got \(4, 8, 8\)"),
        (torch.rand(4, 2, 8, 8), {}, r"C = 1 or 3, got \(4, 2, 8, 8\)"),
        (torch.randint(0, 4, (4, 1, 8, 8)), {}, "need num_bins"),
        (torch.full((4, 1, 8, 8), 17), {"num_bins": 17}, r"must lie in \[0, 17\), got \[17, 17\]"),
        (torch.rand(0, 1, 8, 8), {}, "no images"),
    ],
    ids=["ndim", "channels", "no-num-bins", "out-of-range", "empty"],
)
def test_image_grid_rejects_bad_input(tmp_path, images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        plots.image_grid(images, tmp_path / "x.png", **kwargs)


@pytest.mark.parametrize("features", [1, 2, 5])
def test_scatter_writes_a_png_for_any_dimension(tmp_path, features):
    samples = torch.randn(300, features)
    samples[0] = float("nan")  # skipped
    path = plots.scatter(samples, tmp_path / "s.png", data=torch.randn(200, features) + 1, max_dims=3)
    side = 500 if features <= 2 else int(2.2 * 3 * 100)  # a 3 x 3 matrix for max_dims = 3
    assert read_png(path).shape[:2] == (side, side)


def test_scatter_rejects_mismatched_data(tmp_path):
    with pytest.raises(ValueError, match=r"data must have shape \(N, 3\), got \(10, 2\)"):
        plots.scatter(torch.randn(10, 3), tmp_path / "x.png", data=torch.randn(10, 2))
    with pytest.raises(ValueError, match=r"samples must have shape \(N, D\), got \(10,\)"):
        plots.scatter(torch.randn(10), tmp_path / "x.png")


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "samples.png"
    plots.scatter(torch.randn(50, 2), path)
    old = path.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["samples.png"]  # no temporary left behind

    def failing_savefig(self, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        plots.scatter(torch.randn(50, 2), path)
    assert path.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["samples.png"]


def test_importing_plots_does_not_import_matplotlib():
    code = "import sys, pyro_flowpack.plots; print(any(m.startswith('matplotlib') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.stdout.strip() == "False"


def test_plots_leave_pyplot_alone(tmp_path):
    plots.loss_curve(loss_records(), tmp_path / "loss.png")
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()


def test_loss_curve_rejects_records_that_are_not_dicts(tmp_path):
    with pytest.raises(ValueError, match="each record must be a dict, got float"):
        plots.loss_curve([1.0, 2.0], tmp_path / "loss.png")
    with pytest.raises(ValueError, match="got one dict"):
        plots.loss_curve({"step": 0, "train_loss": 1.0}, tmp_path / "loss.png")
