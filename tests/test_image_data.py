r"""The image data sets: the offline digits set, torchvision's MNIST, Fashion-MNIST and
CIFAR-10 read from files in their real on-disk formats, the loader and the errors.

There is no network here, so the torchvision tests write a few images in the formats
torchvision reads (idx-ubyte files for MNIST, pickled batches for CIFAR-10) and load them
through the real code path with ``download=False``; pixels must round-trip exactly.
"""

import hashlib
import pickle
import struct
import sys

import numpy as np
import pytest
import torch

from pyro_flowpack.data.images import (
    IMAGE_DATASETS,
    ImageDataset,
    cifar10,
    digits,
    fashion_mnist,
    image_dataset,
    mnist,
)

DIGITS_SIZE = 1797
# Tiny stand-ins for the real splits: (train, test) image counts.
SIZES = {"train": 5, "test": 3}


def _pixels(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    return generator.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 100).integers(0, 10, size=n, dtype=np.uint8)


def _write_idx(path, array: np.ndarray, magic: int) -> None:
    """Writes an idx-ubyte file: a big-endian magic number (2051 images, 2049 labels),
    the big-endian dimensions, then the raw bytes."""
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    path.write_bytes(header + array.tobytes())


def _write_mnist(root, folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes ``root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, unzipped,
    as torchvision's ``MNIST._check_exists`` and ``_load_data`` expect; both splits must be
    present for either to load."""
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    written = {}
    for seed, (split, prefix) in enumerate([("train", "train"), ("test", "t10k")]):
        images, labels = _pixels(SIZES[split], (28, 28), seed), _labels(SIZES[split], seed)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images, magic=2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, magic=2049)
        written[split] = images, labels
    return written


def _write_cifar10(root, monkeypatch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` as
    pickled dicts with rows of 3072 bytes (1024 red, then green, then blue, each row-major).

    torchvision checks every file against the MD5 of the official one, which tiny files
    cannot match; the test points the class's checksum lists at the files written here, so
    that the real integrity check still runs.
    """
    from torchvision.datasets import CIFAR10

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {"train": ([], []), "test": ([], [])}
    names = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
    checksums = {}
    for seed, (name, split) in enumerate(names):
        rows, labels = _pixels(SIZES[split], (3072,), seed), _labels(SIZES[split], seed)
        (folder / name).write_bytes(pickle.dumps({"data": rows, "labels": labels.tolist()}))
        checksums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
        written[split][0].append(rows)
        written[split][1].append(labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class {i}" for i in range(10)]}))
    monkeypatch.setattr(CIFAR10, "train_list", [[name, checksums[name]] for name, _ in names[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", checksums["test_batch"]]])
    meta_md5 = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": meta_md5})
    return {split: tuple(map(np.concatenate, arrays)) for split, arrays in written.items()}


def _examples(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, ...]]:
    """The (pixels..., label) rows, sorted: a multiset, to compare sets held in any order."""
    return sorted(map(tuple, torch.cat([images.flatten(1).long(), labels[:, None]], dim=1).tolist()))


def test_digits_are_1x8x8_uint8_with_17_levels():
    data = digits()
    assert data.images.shape == (len(data), 1, 8, 8)
    assert data.shape == (1, 8, 8)
    assert data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.long
    assert data.num_bins == 17
    assert int(data.images.min()) == 0 and int(data.images.max()) == 16
    assert set(data.labels.tolist()) == set(range(10))


def test_digits_splits_partition_the_1797_images_and_are_fixed():
    from sklearn.datasets import load_digits

    train, test = digits("train"), digits("test")
    assert (len(train), len(test)) == (1438, 359)
    pixels, targets = load_digits(return_X_y=True)
    # The two splits together hold each of scikit-learn's (image, label) pairs exactly once:
    # compared as multisets, since the set holds a few identical images.
    both = _examples(torch.cat([train.images, test.images]), torch.cat([train.labels, test.labels]))
    assert both == _examples(torch.from_numpy(pixels).to(torch.uint8), torch.from_numpy(targets))
    # Fixed: the same for every user and call, whatever the global random state.
    torch.manual_seed(123)
    again = digits("test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert test.labels[:12].tolist() == [0, 4, 1, 2, 6, 7, 5, 6, 9, 1, 7, 5]
    assert int(test.images.long().sum()) == 111715


def test_digits_seed_and_test_fraction_change_the_split():
    assert not torch.equal(digits("test", seed=1).images, digits("test", seed=0).images)
    assert len(digits("test", test_fraction=0.5)) == round(0.5 * DIGITS_SIZE)
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=1.0)


def test_digits_without_scikit_learn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        digits()


@pytest.mark.parametrize(("load", "folder"), [(mnist, "MNIST"), (fashion_mnist, "FashionMNIST")])
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_files_round_trip_exactly(tmp_path, load, folder, split):
    images, labels = _write_mnist(tmp_path, folder)[split]
    data = load(tmp_path, split=split)
    assert data.images.shape == (SIZES[split], 1, 28, 28) and data.shape == (1, 28, 28)
    assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.long
    assert data.num_bins == 256
    assert torch.equal(data.images[:, 0], torch.from_numpy(images))
    assert torch.equal(data.labels, torch.from_numpy(labels).long())


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_batches_round_trip_exactly_as_channels_first(tmp_path, monkeypatch, split):
    rows, labels = _write_cifar10(tmp_path, monkeypatch)[split]
    data = cifar10(tmp_path, split=split, download=False)
    n = 5 * SIZES["train"] if split == "train" else SIZES["test"]
    assert data.images.shape == (n, 3, 32, 32) and data.shape == (3, 32, 32)
    assert data.images.dtype == torch.uint8 and data.images.is_contiguous()
    assert data.num_bins == 256
    assert torch.equal(data.images, torch.from_numpy(rows).view(n, 3, 32, 32))
    assert torch.equal(data.labels, torch.from_numpy(labels).long())


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_dataset_names_the_root_and_download_flag(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="download=True") as error:
        image_dataset(name, root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_cifar10_files_failing_the_official_checksums_are_reported_as_not_found(tmp_path, monkeypatch):
    _write_cifar10(tmp_path, monkeypatch)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="corrupted"):
        cifar10(tmp_path)


def test_registry_names_the_four_sets_and_image_dataset_uses_it(tmp_path):
    assert list(IMAGE_DATASETS) == ["digits", "mnist", "fashion_mnist", "cifar10"]
    assert torch.equal(image_dataset("digits", split="test").images, digits("test").images)
    _write_mnist(tmp_path, "MNIST")
    assert torch.equal(image_dataset("mnist", tmp_path, "test").images, mnist(tmp_path, "test").images)


def test_unknown_name_split_or_missing_root_raise_value_errors():
    with pytest.raises(ValueError, match="valid names are digits, mnist, fashion_mnist, cifar10"):
        image_dataset("svhn")
    for name in IMAGE_DATASETS:
        with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
            image_dataset(name, root=".", split="validation")
    with pytest.raises(ValueError, match="split must be"):
        mnist(".", split="val")
    with pytest.raises(ValueError, match="root is required"):
        image_dataset("mnist")


def test_loader_visits_every_image_once_per_epoch_in_a_seeded_order():
    data = digits("test")
    loader = data.loader(batch_size=100, seed=3)
    assert len(loader) == 4
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [len(x) for x, _ in batches] == [100, 100, 100, 59]
        images = torch.cat([x for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        assert images.dtype == torch.uint8 and images.shape[1:] == (1, 8, 8)
        assert _examples(images, labels) == _examples(data.images, data.labels)
        epochs.append(images)
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(torch.cat([x for x, _ in data.loader(100, seed=3)]), epochs[0])


def test_loader_without_shuffle_keeps_the_order_and_can_drop_the_last_batch():
    data = digits("test")
    batches = list(data.loader(batch_size=100, shuffle=False, drop_last=True))
    assert len(batches) == 3
    assert torch.equal(torch.cat([x for x, _ in batches]), data.images[:300])
    assert torch.equal(torch.cat([y for _, y in batches]), data.labels[:300])


def test_getitem_returns_an_image_and_its_label():
    data = digits("test")
    image, label = data[7]
    assert image.shape == (1, 8, 8) and torch.equal(image, data.images[7])
    assert label.shape == () and label == data.labels[7]
    images, labels = data[[0, 2]]
    assert images.shape == (2, 1, 8, 8) and labels.shape == (2,)


def test_image_dataset_rejects_floats_out_of_range_pixels_and_bad_labels():
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        ImageDataset(torch.zeros(2, 1, 4, 4), labels, num_bins=4)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        ImageDataset(torch.zeros(2, 4, 4, dtype=torch.uint8), labels, num_bins=4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ImageDataset(torch.full((2, 1, 4, 4), 4, dtype=torch.uint8), labels, num_bins=4)
    with pytest.raises(ValueError, match="one per image"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), labels[:1], num_bins=4)
    with pytest.raises(ValueError, match="batch_size"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), labels, num_bins=4).loader(0)
