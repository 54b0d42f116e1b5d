r"""Discrete image data sets as in-memory integer tensors.

Every loader returns an :class:`ImageDataset`: images of shape ``(N, C, H, W)`` and dtype
``torch.uint8`` (the pixels' own type, a quarter to an eighth of the memory of wider
integers, and what a dequantized flow's ``log_prob`` takes), with values in
``[0, num_bins)``, and labels of dtype ``torch.long``. Nothing is scaled or made
floating: the dequantization is the flow's business.

- :func:`digits` is scikit-learn's bundled 8x8 digits set (17 grey levels): it needs no
  network, which makes it the offline image set of the tests and examples.
- :func:`mnist`, :func:`fashion_mnist` and :func:`cifar10` read torchvision's data sets
  from ``root`` (downloading them there with ``download=True``), through the data sets'
  whole arrays rather than one PIL image at a time.

scikit-learn and torchvision are imported when a loader is called, not with this module.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from ..checks import check_int

__all__ = [
    "IMAGE_DATASETS",
    "ImageDataset",
    "image_dataset",
    "digits",
    "mnist",
    "fashion_mnist",
    "cifar10",
]

SPLITS = ("train", "test")


class ImageDataset(Dataset):
    r"""Integer images, their labels and their number of grey levels, held in memory.

    Arguments:
        images: The images, an integer tensor of shape ``(N, C, H, W)`` with values in
            ``[0, num_bins)``.
        labels: The class labels, of shape ``(N,)``.
        num_bins: The number of levels a pixel can take (256 for 8-bit images).
        name: The name of the data set, for messages and logs.

    Example:
        >>> images = torch.randint(0, 4, (10, 1, 5, 5), dtype=torch.uint8)
        >>> data = ImageDataset(images, torch.zeros(10, dtype=torch.long), num_bins=4)
        >>> len(data), data.shape
        (10, torch.Size([1, 5, 5]))
        >>> x, y = next(iter(data.loader(batch_size=4, seed=0)))
        >>> x.shape, y.shape
        (torch.Size([4, 1, 5, 5]), torch.Size([4]))
    """

    def __init__(self, images: Tensor, labels: Tensor, num_bins: int, name: str = "images"):
        dtype = images.dtype
        if images.dim() != 4 or dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise ValueError(
                f"{name}: images must be an integer tensor of shape (N, C, H, W), "
                f"got dtype {images.dtype} and shape {tuple(images.shape)}"
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"{name}: labels must have shape ({len(images)},), one per image, got {tuple(labels.shape)}"
            )
        num_bins = check_int(num_bins, f"{name}: num_bins", minimum=2)
        if len(images) > 0 and (int(images.min()) < 0 or int(images.max()) >= num_bins):
            raise ValueError(
                f"{name}: pixel values must lie in [0, {num_bins}), "
                f"got [{int(images.min())}, {int(images.max())}]"
            )
        self.images = images
        self.labels = labels
        self.num_bins = num_bins
        self.name = name

    @property
    def shape(self) -> torch.Size:
        r"""The shape ``(C, H, W)`` of one image."""
        return self.images.shape[1:]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        r"""Returns ``(image, label)`` for an int index, or ``(images, labels)`` stacked
        along the first dimension for a slice, a sequence or a tensor of indices."""
        return self.images[index], self.labels[index]

    def loader(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int | None = None,
        drop_last: bool = False,
    ) -> DataLoader:
        r"""Returns a loader of mini-batches ``(images, labels)``.

        Each batch is taken from the in-memory tensors by one indexing operation (the
        loader's sampler yields whole lists of indices), instead of one ``__getitem__``
        per image followed by a collation, which is many times faster. With
        ``shuffle=True`` every pass over the loader (every epoch) draws a new order.
        For distributed training, build a :class:`~torch.utils.data.DataLoader` on the
        data set with a :class:`~torch.utils.data.DistributedSampler` instead.

        Arguments:
            batch_size: The number of images per batch.
            shuffle: Whether to visit the images in a random order.
            seed: The seed of the loader's own generator, which makes the sequence of
                orders reproducible without touching the global random state
                (``None``: each epoch's order is drawn from torch's global generator).
            drop_last: Whether to drop the last batch when it is smaller than
                ``batch_size``.

        Returns:
            A data loader whose items are ``(images, labels)`` of shapes
            ``(B, C, H, W)`` and ``(B,)``.
        """
        batch_size = check_int(batch_size, f"{self.name}: batch_size")
        if shuffle:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            sampler = RandomSampler(self, generator=generator)
        else:
            sampler = SequentialSampler(self)
        return DataLoader(self, batch_size=None, sampler=BatchSampler(sampler, batch_size, drop_last))

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, size={len(self)}, shape={tuple(self.shape)}, "
            f"num_bins={self.num_bins})"
        )


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{name}: split must be 'train' or 'test', got {split!r}")


def digits(split: str = "train", seed: int = 0, test_fraction: float = 0.2) -> ImageDataset:
    r"""Loads scikit-learn's bundled 8x8 handwritten digits, with 17 grey levels.

    The 1797 images (values 0 to 16) ship with scikit-learn, so no network is needed.
    They come without a train/test split; this function fixes one: a permutation drawn
    from a local generator seeded with ``seed`` puts ``round(test_fraction * 1797)``
    images (359 by default) in the test split and the rest (1438) in the train split,
    each kept in the original order. The default seed gives every user the same split;
    the global random state is neither read nor changed.

    Arguments:
        split: ``"train"`` or ``"test"``.
        seed: The seed of the permutation that makes the split.
        test_fraction: The fraction of the images in the test split.

    Returns:
        The images, of shape ``(N, 1, 8, 8)``, with ``num_bins = 17``.

    Example:
        >>> train, test = digits("train"), digits("test")
        >>> len(train), len(test), train.shape, train.num_bins
        (1438, 359, torch.Size([1, 8, 8]), 17)

    References:
        | Optical Recognition of Handwritten Digits (Alpaydin and Kaynak, 1998)
        | https://archive.ics.uci.edu/dataset/80
    """
    _check_split("digits", split)
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "digits needs scikit-learn: pip install scikit-learn "
            "(or install pyro-flowpack with its 'test' extra)"
        ) from error
    pixels, targets = load_digits(return_X_y=True)
    n = len(pixels)
    n_test = round(test_fraction * n)
    if not 0 < n_test < n:
        raise ValueError(
            "digits: test_fraction must leave both splits non-empty (0 < test_fraction < 1), "
            f"got {test_fraction!r}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    index = order[:n_test] if split == "test" else order[n_test:]
    index = index.sort().values
    images = torch.from_numpy(pixels.astype("uint8")).view(n, 1, 8, 8)[index]
    labels = torch.from_numpy(targets).long()[index]
    return ImageDataset(images, labels, num_bins=17, name="digits")


def _torchvision_dataset(
    name: str, class_name: str, folder: str, root: str | os.PathLike[str], split: str, download: bool
):
    """Builds ``torchvision.datasets.<class_name>`` and turns its not-found error into one
    that says where it looked and how to download."""
    _check_split(name, split)
    try:
        import torchvision.datasets
    except ImportError as error:
        raise ImportError(f"{name} needs torchvision: pip install torchvision") from error
    try:
        return getattr(torchvision.datasets, class_name)(root, train=split == "train", download=download)
    except RuntimeError as error:
        if download:
            raise
        where = os.path.join(os.path.expanduser(os.fspath(root)), folder)
        raise FileNotFoundError(
            f"{class_name} not found (or its files are corrupted) in {where!r}, "
            f"under root={os.fspath(root)!r}; pass download=True to download it there "
            "(this needs a network connection)"
        ) from error


def mnist(root: str | os.PathLike[str], split: str = "train", download: bool = False) -> ImageDataset:
    r"""Loads MNIST through torchvision, as 1x28x28 images with 256 grey levels.

    Arguments:
        root: The directory under which torchvision keeps the data set (its files are
            ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``).
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        download: Whether to download the data set into ``root`` if it is not there.

    Returns:
        The images, of shape ``(N, 1, 28, 28)``, with ``num_bins = 256``.

    Raises:
        FileNotFoundError: If the data set is not in ``root`` and ``download`` is false.

    Example:
        >>> mnist("~/data", split="test", download=True).shape  # doctest: +SKIP
        torch.Size([1, 28, 28])

    References:
        | Gradient-Based Learning Applied to Document Recognition (LeCun et al., 1998)
        | http://yann.lecun.com/exdb/mnist
    """
    dataset = _torchvision_dataset("mnist", "MNIST", "MNIST", root, split, download)
    return ImageDataset(dataset.data.unsqueeze(1), dataset.targets.long(), num_bins=256, name="mnist")


def fashion_mnist(root: str | os.PathLike[str], split: str = "train", download: bool = False) -> ImageDataset:
    r"""Loads Fashion-MNIST through torchvision, as 1x28x28 images with 256 grey levels.

    Arguments:
        root: The directory under which torchvision keeps the data set (its files are
            ``root/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``).
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).
        download: Whether to download the data set into ``root`` if it is not there.

    Returns:
        The images, of shape ``(N, 1, 28, 28)``, with ``num_bins = 256``.

    Raises:
        FileNotFoundError: If the data set is not in ``root`` and ``download`` is false.

    Example:
        >>> fashion_mnist("~/data", split="test", download=True).shape  # doctest: +SKIP
        torch.Size([1, 28, 28])

    References:
        | Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
          Algorithms (Xiao et al., 2017)
        | https://arxiv.org/abs/1708.07747
    """
    dataset = _torchvision_dataset("fashion_mnist", "FashionMNIST", "FashionMNIST", root, split, download)
    return ImageDataset(dataset.data.unsqueeze(1), dataset.targets.long(), num_bins=256, name="fashion_mnist")


def cifar10(root: str | os.PathLike[str], split: str = "train", download: bool = False) -> ImageDataset:
    r"""Loads CIFAR-10 through torchvision, as 3x32x32 colour images with 256 levels.

    Arguments:
        root: The directory under which torchvision keeps the data set (its files are
            ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``).
        split: ``"train"`` (50000 images) or ``"test"`` (10000 images).
        download: Whether to download the data set into ``root`` if it is not there.

    Returns:
        The images, of shape ``(N, 3, 32, 32)``, with ``num_bins = 256``.

    Raises:
        FileNotFoundError: If the data set is not in ``root`` (or fails torchvision's
            checksums) and ``download`` is false.

    Example:
        >>> cifar10("~/data", split="test", download=True).shape  # doctest: +SKIP
        torch.Size([3, 32, 32])

    References:
        | Learning Multiple Layers of Features from Tiny Images (Krizhevsky, 2009)
        | https://www.cs.toronto.edu/~kriz/cifar.html
    """
    dataset = _torchvision_dataset("cifar10", "CIFAR10", "cifar-10-batches-py", root, split, download)
    # torchvision holds the pixels as a NumPy array (N, H, W, C): a view to (N, C, H, W).
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images, torch.tensor(dataset.targets, dtype=torch.long), num_bins=256, name="cifar10")


IMAGE_DATASETS: dict[str, Callable[..., ImageDataset]] = {
    "digits": digits,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
}


def image_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    split: str = "train",
    download: bool = False,
) -> ImageDataset:
    r"""Loads the image data set called ``name``.

    Arguments:
        name: A key of :data:`IMAGE_DATASETS`.
        root: The directory of the torchvision data sets; ignored by ``"digits"``, which
            ships with scikit-learn, and required by the others.
        split: ``"train"`` or ``"test"``.
        download: Whether to download a torchvision data set into ``root`` if it is not
            there; ignored by ``"digits"``.

    Returns:
        The data set (``digits`` with its default fixed split).

    Example:
        >>> image_dataset("digits", split="test")
        ImageDataset(name='digits', size=359, shape=(1, 8, 8), num_bins=17)
    """
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image data set {name!r}; valid names are {', '.join(IMAGE_DATASETS)}")
    _check_split(name, split)
    if name == "digits":
        return digits(split)
    if root is None:
        raise ValueError(f"{name}: root is required, the directory where torchvision keeps (or downloads) it")
    return IMAGE_DATASETS[name](root, split=split, download=download)
