r"""examples/train_images.py runs end to end on digits with tiny settings and writes what it
promises: finite bits/dim, a sample grid, a loss curve and the metrics."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_images.py"
STEPS = 3  # fewer than one digits epoch (12 steps of 128 images): a single, partial epoch


@pytest.fixture(scope="module", params=[("glow", "uniform"), ("realnvp", "variational")], ids="-".join)
def run(request, tmp_path_factory) -> tuple[Path, str, tuple[str, str]]:
    flow, dequantization = request.param
    out = tmp_path_factory.mktemp(f"train_images_{flow}_{dequantization}")
    command = [
        sys.executable, str(EXAMPLE), "--flow", flow, "--dequantization", dequantization,
        "--steps", str(STEPS), "--depth", "1", "--hidden-channels", "8", "--k", "2",
        "--threads", "1", "--seed", "1", "--out", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out, result.stdout, request.param


def test_train_images_reports_finite_bits_per_dim_and_its_settings(run):
    out, stdout, (flow, dequantization) = run
    assert "final test bits/dim" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["flow"], metrics["dequantization"]) == ("digits", flow, dequantization)
    assert (metrics["steps"], metrics["seed"], metrics["k"]) == (STEPS, 1, 2)
    assert math.isfinite(metrics["test_bpd"]) and math.isfinite(metrics["test_iw_bpd"])
    # Loose sanity bounds for an almost untrained flow on 17-level pixels (a uniform
    # model scores log2(17) = 4.09 bits/dim).
    assert 0 < metrics["test_iw_bpd"] < 10 and 0 < metrics["test_bpd"] < 10
    assert [h["step"] for h in metrics["history"]] == [STEPS]
    assert all(math.isfinite(h["train_bpd"]) and math.isfinite(h["test_bpd"]) for h in metrics["history"])


def test_train_images_writes_sample_grid_and_loss_curve_as_png_without_temporary_files(run):
    out, _, _ = run
    with Image.open(out / "samples.png") as png:
        assert png.format == "PNG"
        # 8 x 8 samples of 8x8 pixels enlarged 4 times, with 2 pixels of padding around each
        assert png.size == (8 * (32 + 2) + 2, 8 * (32 + 2) + 2)
    with Image.open(out / "loss.png") as png:
        assert png.format == "PNG" and png.size == (640, 360)
        colours = pil_to_tensor(png.convert("RGB")).flatten(1).unique(dim=1)
        assert colours.shape[1] > 2, "the curves and axes are drawn on the white canvas"
    assert not list(out.glob(".*")), "a temporary file was left behind"
