r"""The example scripts run end to end with tiny settings and write what they promise."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TRAIN_2D = EXAMPLES / "train_2d.py"


def load_example(path: Path):
    """Imports an example script as a module, to read its layout constants."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_2d_output(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_2d")
    command = [sys.executable, str(TRAIN_2D), "--steps", "20", "--batch", "64", "--seed", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "final test NLL" in result.stdout
    return out


def test_train_2d_writes_finite_test_nll_and_settings(train_2d_output):
    metrics = json.loads((train_2d_output / "metrics.json").read_text())
    assert math.isfinite(metrics["test_nll"])
    assert metrics["steps"] == 20
    assert (metrics["dataset"], metrics["flow"], metrics["seed"]) == ("checkerboard", "nsf", 1)


def test_train_2d_picture_has_three_normalised_panels_between_white_separators(train_2d_output):
    example = load_example(TRAIN_2D)
    panel, separator = example.PANEL, example.SEPARATOR
    with Image.open(train_2d_output / "density.png") as png:
        assert png.format == "PNG"
        image = pil_to_tensor(png.convert("RGB"))
    assert image.shape == (3, panel, 3 * panel + 2 * separator)
    assert not list(train_2d_output.glob(".*")), "a temporary file was left behind"

    starts = [0, panel + separator, 2 * (panel + separator)]
    for start in starts[1:]:
        assert (image[:, :, start - separator : start] == 255).all()
    # Each panel is normalised to [0, 1], so its maximum takes the top colour of the map
    # (to within PNG's 8-bit rounding).
    top = (example.VIRIDIS[-1] * 255).round().to(torch.uint8)
    for start in starts:
        pixels = image[:, :, start : start + panel].reshape(3, -1).T.int()
        assert (pixels - top.int()).abs().max(dim=-1).values.min() <= 1
