"""Pictures say what they show, and the small promises of the ``flowpack`` command.

* Every picture's title (drawn, and stored as the PNG's ``Title`` text chunk, read here
  by parsing the chunks) names the data set, the flow, the test NLL of the model it shows
  (tabular: also in data units; images: bits/dim) and, for samples, the temperature.
* A scatter matrix of a subset says which features it shows; its axes carry the CSV
  header's names.
* ``flowpack sample`` never writes over the run's own files: its default goes to
  ``RUN_DIR/samples/``, and an ``-o`` that would hit a run file exits 2 writing nothing.
* ``--no-progress`` prints exactly one line per epoch; ``fit`` stays quiet by default.
* ``flowpack --version``.

Runs are tiny (one coupling layer, 8 hidden units, a few hundred rows), one thread.
"""

import contextlib
import io
import json
import re
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from cli_support import flowpack
import pyro_flowpack as pf
from pyro_flowpack import plots
from pyro_flowpack.cli import main
from pyro_flowpack.train import TrainConfig, fit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--size", "500", "--transforms", "1", "--hidden", "8", "--epochs", "2", "--no-progress", "--threads", "1"]
HEADER = ["height", "weight", "age", "income", "score", "rate"]


def png_title(path):
    """The ``Title`` of a PNG's tEXt chunks (``None`` without one)."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    position, texts = 8, {}
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"tEXt":
            key, _, value = data[position + 8:position + 8 + length].partition(b"\0")
            texts[key.decode("latin-1")] = value.decode("latin-1")
        position += 12 + length  # length, type, body, CRC
    return texts.get("Title")


def quiet_main(argv):
    """``main(argv)`` from a module fixture (no capsys there); returns status and stderr."""
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        status = main([str(a) for a in argv])
    return status, stderr.getvalue()


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    """A tiny 2-D run of 3 epochs and what it printed on standard error."""
    run = tmp_path_factory.mktemp("pictures") / "moons"
    status, err = quiet_main(["train", "--data", "moons", "--out", run, *TINY, "--epochs", "3"])
    assert status == 0, err
    return run, err


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A tiny run on a 6-column CSV file with a header line."""
    folder = tmp_path_factory.mktemp("table")
    rows = np.random.default_rng(0).normal([170, 70, 40, 3e4, 0, 0.1], [10, 12, 15, 1e4, 1, 0.02], (400, 6))
    path = folder / "people.csv"
    np.savetxt(path, rows, delimiter=",", header=",".join(HEADER), comments="")
    run = folder / "run"
    status, err = quiet_main(["train", "--data", path, "--out", run, *TINY])
    assert status == 0, err
    return run


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots functions save (still written to their files)."""
    saved = []
    save = plots._save

    def keep(figure, path):
        saved.append(figure)
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def run_files(run):
    """Every file of a run folder but the sample draws, with its bytes."""
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.relative_to(run).parts[0] != "samples"}


# -- titles ------------------------------------------------------------------------------


def test_training_pictures_name_the_data_set_the_flow_and_the_test_nll(moons):
    run, _ = moons
    summary = json.loads((run / "summary.json").read_text())
    heading = f"two_moons | nsf | test NLL {summary['nll']:.4f} nats"
    assert png_title(run / "loss.png") == heading
    assert png_title(run / "density.png") == heading + " | samples at T=1"


def test_tabular_pictures_give_the_nll_in_data_units_the_subset_and_the_header_names(table, capsys, figures):
    summary = json.loads((table / "summary.json").read_text())
    title = png_title(table / "samples.png")
    assert title == (f"people.csv | nsf | test NLL {summary['nll']:.4f} nats (standardised), "
                     f"{summary['nll_data_units']:.4f} nats in data units | samples at T=1 | features 1-4 of 6")

    status, _, err = flowpack(["sample", table, "-n", 50, "--temperature", 0.5], capsys)
    assert status == 0, err
    assert png_title(table / "samples" / "best-n50-seed0-T0.5.png") == title.replace("T=1", "T=0.5")
    (figure,) = figures
    grid = np.array(figure.axes).reshape(4, 4)
    assert [axes.get_xlabel() for axes in grid[-1]] == HEADER[:4]  # the first four columns, by name
    assert [axes.get_ylabel() for axes in grid[:, 0]] == HEADER[:4]


def test_image_pictures_give_bits_per_dim_and_the_temperature(tmp_path, capsys):
    run = tmp_path / "digits"
    status, _, err = flowpack(["train", "--data", "digits", "--size", 64, "--batch-size", 32, "--depth", 1,
                               "--levels", 1, "--hidden-channels", 8, "--epochs", 1, "--k", 2, "--no-progress",
                               "--threads", 1, "--out", run], capsys)
    assert status == 0, err
    summary = json.loads((run / "summary.json").read_text())
    heading = (f"digits | glow | test {summary['bpd_bound']:.4f} bits/dim (bound), "
               f"{summary['bpd_iw']:.4f} (importance-weighted, k=2)")
    assert png_title(run / "loss.png") == heading
    assert png_title(run / "samples.png") == heading + " | samples at T=0.7"
    status, _, err = flowpack(["sample", run, "-n", 4, "--temperature", 0.3, "-o", tmp_path / "grid.npy"], capsys)
    assert status == 0, err
    assert png_title(tmp_path / "grid.png") == heading + " | samples at T=0.3"


def test_a_sample_of_another_checkpoint_does_not_claim_the_summary_nll(moons, tmp_path, capsys):
    run, _ = moons  # summary.json evaluated best.pt; last.pt may hold another model
    status, _, err = flowpack(["sample", run, "--checkpoint", "last", "-o", tmp_path / "last.npy"], capsys)
    assert status == 0, err
    assert png_title(tmp_path / "last.png") == "two_moons | nsf | samples at T=1"


@pytest.mark.parametrize("max_dims, title, expected", [
    (2, None, "features 1-2 of 3"), (1, "mine", "mine | feature 1 of 3"), (3, "mine", "mine"), (3, None, None)])
def test_scatter_says_which_features_it_shows(tmp_path, max_dims, title, expected):
    path = plots.scatter(torch.randn(100, 3), tmp_path / "s.png", max_dims=max_dims, title=title)
    assert png_title(path) == expected


def test_scatter_labels_axes_by_name_and_refuses_a_wrong_count(tmp_path, figures):
    plots.scatter(torch.randn(100, 2), tmp_path / "s.png", names=["a $cost", "b"])
    (axes,) = figures[0].axes
    assert (axes.get_xlabel(), axes.get_ylabel()) == (r"a \$cost", "b")  # a $ is shown, not read as maths
    with pytest.raises(ValueError, match="names must be a list of 2 names"):
        plots.scatter(torch.randn(100, 2), tmp_path / "x.png", names=["a"])


def test_pictures_without_a_title_have_none(tmp_path):
    assert png_title(plots.loss_curve([{"step": 0, "train_loss": 1.0}], tmp_path / "loss.png")) is None
    assert png_title(plots.image_grid(torch.rand(4, 1, 8, 8), tmp_path / "grid.png")) is None


def test_an_image_grid_title_sits_above_a_grid_of_unchanged_pixels(tmp_path):
    images = torch.rand(4, 1, 8, 8)
    plain = matplotlib.image.imread(plots.image_grid(images, tmp_path / "plain.png"))
    titled_path = plots.image_grid(images, tmp_path / "titled.png", title="digits | glow | samples at T=0.7")
    titled = matplotlib.image.imread(titled_path)
    assert titled.shape[1] == plain.shape[1] and titled.shape[0] > plain.shape[0]
    np.testing.assert_array_equal(titled[-plain.shape[0]:], plain)  # a band above; the grid is the same
    assert png_title(titled_path) == "digits | glow | samples at T=0.7"


# -- sample never overwrites the run -------------------------------------------------------


def test_sample_by_default_leaves_every_run_file_as_it_was(moons, table, capsys):
    # moons: loss.png and density.png; the table: loss.png and samples.png
    for run, options, name, count in [(moons[0], [], "best-n64-seed0-T1", 64),
                                      (table, ["-n", 7, "--seed", 3, "--temperature", 0.5], "best-n7-seed3-T0.5", 7)]:
        before = run_files(run)
        status, out, err = flowpack(["sample", run, *options], capsys)
        assert status == 0, err
        assert run_files(run) == before
        assert np.load(run / "samples" / f"{name}.npy").shape[0] == count
        assert png_title(run / "samples" / f"{name}.png") and f"{name}.png" in out


@pytest.mark.parametrize("name", ["loss.npy", "density.npy", "samples.npy", "samples.pt", "checkpoints/last.pt",
                                  "checkpoints/new.npy", "sub/../loss.pt"])
def test_sample_refuses_an_output_over_the_runs_own_files(moons, name, capsys):
    run, _ = moons
    before = run_files(run)
    status, out, err = flowpack(["sample", run, "-o", f"{run}/{name}"], capsys)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "the run's own files" in err, err
    assert run_files(run) == before


def test_sample_help_documents_the_default(capsys):
    status, out, _ = flowpack(["sample", "--help"], capsys)
    assert status == 0 and "RUN_DIR/samples/{best|last}-n{N}-seed{S}-T{T}.npy" in " ".join(out.split())


# -- progress lines and the version --------------------------------------------------------


def test_no_progress_prints_exactly_one_line_per_epoch(moons):
    run, err = moons
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [f"epoch {r['epoch']}: train {r['train_loss']:.4f}, valid {r['valid_loss']:.4f} nats"
                for r in records if "valid_loss" in r]
    assert len(expected) == 3
    assert [line for line in err.splitlines() if re.match(r"epoch \d", line)] == expected


def test_fit_prints_epoch_lines_only_when_asked(capsys):
    flow = pf.flows.RealNVP(features=2, transforms=1, hidden=(4,))
    fit(flow, torch.randn(64, 2), torch.randn(16, 2), TrainConfig(epochs=2, batch_size=32, progress=False))
    assert capsys.readouterr().err == ""  # a library call stays quiet
    fit(flow, torch.randn(64, 2), None, TrainConfig(epochs=2, batch_size=32, progress=False, epoch_lines=True))
    assert re.fullmatch(r"epoch 1: train \S+ nats\nepoch 2: train \S+ nats\n", capsys.readouterr().err)


def test_version(capsys):
    status, out, _ = flowpack(["--version"], capsys)
    assert status == 0 and out == f"flowpack {pf.__version__}\n"
