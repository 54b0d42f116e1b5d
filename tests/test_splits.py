r"""load_data, the one entry point of the trainer and the CLI: toy, tabular and image sets
by name or path, with disjoint splits that are deterministic in the seed."""

import numpy as np
import pytest
import torch

from pyro_flowpack.data import DATA_ALIASES, DATA_NAMES, DataSplits, digits, load_data
from pyro_flowpack.data.images import IMAGE_DATASETS
from pyro_flowpack.data.toy import TOY_DATASETS
from test_image_data import _write_mnist


def _rows(*tensors: torch.Tensor) -> list[tuple]:
    return sorted(tuple(row.tolist()) for tensor in tensors for row in tensor.reshape(len(tensor), -1))


def _same(a: DataSplits, b: DataSplits) -> bool:
    return all(torch.equal(getattr(a, split), getattr(b, split)) for split in ("train", "valid", "test"))


# Names.


def test_data_names_hold_toy_sets_aliases_and_images():
    assert set(DATA_NAMES) == {*TOY_DATASETS, *DATA_ALIASES, *IMAGE_DATASETS}
    assert {"moons", "spirals", "8gaussians", "gaussians", "digits", "cifar10"} <= set(DATA_NAMES)


@pytest.mark.parametrize("alias", sorted(DATA_ALIASES))
def test_aliases_give_the_full_name(alias):
    short, full = load_data(alias, size=50), load_data(DATA_ALIASES[alias], size=50)
    assert short.name == full.name == DATA_ALIASES[alias]
    assert _same(short, full)


def test_names_ignore_case_and_dashes():
    assert _same(load_data("Two-Moons", size=50), load_data("two_moons", size=50))


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown data set 'moon'.*two_moons.*moons.*digits"):
        load_data("moon")


def test_missing_tabular_path_is_a_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        load_data(str(tmp_path / "absent.csv"))
    with pytest.raises(FileNotFoundError, match=r"no such file"):
        load_data("absent.npz")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"valid_fraction": 1.0}, r"valid_fraction must lie in \[0, 1\)"),
        ({"test_fraction": -0.1}, r"test_fraction must lie in \[0, 1\)"),
        ({"valid_fraction": 0.5, "test_fraction": 0.5}, r"must be below 1"),
        ({"size": 0}, r"size \(or None\) must be an int >= 1"),
        ({"seed": 1.5}, r"seed must be an int"),
        ({"key": "x"}, r"key='x' applies only to .npz and .pt files"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_data("moons", **kwargs)


# Toy sets.


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_splits_have_the_stated_sizes_and_are_disjoint(name):
    data = load_data(name, size=400, seed=3)
    assert (data.kind, data.name, data.event_shape) == ("toy", name, torch.Size([2]))
    # 400 train points are 80% of 500: 50 valid and 50 test.
    assert (len(data.train), len(data.valid), len(data.test)) == (400, 50, 50)
    assert all(split.dtype == torch.float32 for split in (data.train, data.valid, data.test))
    rows = _rows(data.train, data.valid, data.test)
    assert len(set(rows)) == len(rows) == 500


def test_toy_default_size_is_20000():
    data = load_data("eight_gaussians")
    assert (len(data.train), len(data.valid), len(data.test)) == (20000, 2500, 2500)


def test_toy_is_deterministic_in_the_seed():
    assert _same(load_data("pinwheel", size=100, seed=7), load_data("pinwheel", size=100, seed=7))
    assert not torch.equal(load_data("pinwheel", size=100, seed=7).train, load_data("pinwheel", size=100, seed=8).train)


# Tabular files.


def _table(n=200, seed=0) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return (generator.normal(size=(n, 4)) * [1.0, 10.0, 0.1, 3.0] + [0.0, 50.0, -1.0, 7.0]).astype(np.float32)


def test_tabular_splits_are_standardised_by_train_statistics(tmp_path):
    table = _table()
    np.save(tmp_path / "x.npy", table)
    data = load_data(str(tmp_path / "x.npy"), seed=1)
    assert (data.kind, data.name, data.event_shape) == ("tabular", str(tmp_path / "x.npy"), torch.Size([4]))
    assert (len(data.train), len(data.valid), len(data.test)) == (160, 20, 20)
    torch.testing.assert_close(data.train.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.train.std(0, correction=0), torch.ones(4), atol=1e-5, rtol=0)
    # The statistics are the train split's, not the whole file's.
    original = data.standardizer.inverse(data.train)
    torch.testing.assert_close(data.standardizer.mean, original.mean(0), atol=1e-4, rtol=1e-5)


def test_tabular_splits_partition_the_rows(tmp_path):
    table = _table()
    np.save(tmp_path / "x.npy", table)
    data = load_data(tmp_path / "x.npy")
    back = [data.standardizer.inverse(split) for split in (data.train, data.valid, data.test)]
    # Every row once, in data units again (float32 round trip of values up to ~80).
    restored = torch.tensor(_rows(*back))
    torch.testing.assert_close(restored, torch.tensor(_rows(torch.from_numpy(table))), atol=1e-4, rtol=1e-6)


def test_tabular_is_deterministic_in_the_seed(tmp_path):
    np.save(tmp_path / "x.npy", _table())
    path = str(tmp_path / "x.npy")
    assert _same(load_data(path, seed=5), load_data(path, seed=5))
    assert not torch.equal(load_data(path, seed=5).test, load_data(path, seed=6).test)


def test_tabular_key_and_size(tmp_path):
    np.savez(tmp_path / "x.npz", a=_table(seed=1), b=_table(seed=2))
    data = load_data(str(tmp_path / "x.npz"), key="b", size=50, valid_fraction=0.2, test_fraction=0.0)
    assert (len(data.train), len(data.valid), len(data.test)) == (50, 40, 0)
    with pytest.raises(ValueError, match=r"choose one with key="):
        load_data(str(tmp_path / "x.npz"))


def test_tabular_errors_come_before_training(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n3,oops\n")
    with pytest.raises(ValueError, match=r"column 'b' \(column 2\) is not numeric: line 3 holds 'oops'"):
        load_data(str(path))
    np.save(tmp_path / "small.npy", _table(n=3))
    # round(0.5 * 3) = 2 valid and round(0.4 * 3) = 1 test rows leave none to train on.
    with pytest.raises(ValueError, match=r"3 rows leave 0 for the train split"):
        load_data(str(tmp_path / "small.npy"), valid_fraction=0.5, test_fraction=0.4)


# Image sets.


def test_digits_offline():
    data = load_data("digits", seed=0)
    assert (data.kind, data.event_shape, data.num_bins) == ("image", torch.Size([1, 8, 8]), 17)
    assert data.train.dtype == torch.uint8 and data.standardizer is None
    # digits' own split is 1438 / 359; a seeded 10% of train (144) becomes the validation split.
    assert (len(data.train), len(data.valid), len(data.test)) == (1294, 144, 359)
    assert {split: len(labels) for split, labels in data.labels.items()} == {"train": 1294, "valid": 144, "test": 359}
    train = digits("train")
    assert _rows(data.train, data.valid) == _rows(train.images)
    assert torch.equal(data.test, digits("test").images)
    other = load_data("digits", seed=1)
    assert torch.equal(other.test, data.test) and not torch.equal(other.valid, data.valid)


def test_mnist_from_files_in_the_real_format(tmp_path):
    written = _write_mnist(tmp_path, "MNIST")
    data = load_data("mnist", root=tmp_path, valid_fraction=0.4, seed=0)
    assert (data.kind, data.event_shape, data.num_bins) == ("image", torch.Size([1, 28, 28]), 256)
    assert (len(data.train), len(data.valid), len(data.test)) == (3, 2, 3)
    images, labels = written["train"]
    index = {tuple(row): i for i, row in enumerate(images.reshape(len(images), -1).tolist())}
    for split in ("train", "valid"):
        for image, label in zip(getattr(data, split), data.labels[split]):
            i = index[tuple(image.flatten().tolist())]
            assert label.item() == labels[i]
    assert sorted(index[tuple(im.flatten().tolist())] for im in (*data.train, *data.valid)) == list(range(5))
    assert torch.equal(data.test, torch.from_numpy(written["test"][0]).unsqueeze(1))


def test_mnist_needs_root():
    with pytest.raises(ValueError, match=r"root is required"):
        load_data("mnist")
