r"""One entry point to every data set: train, validation and test splits by name or path.

:func:`load_data` is what the trainer and the ``flowpack`` command call. Its ``spec`` is

- the name of a toy 2-D set (:data:`~pyro_flowpack.data.toy.TOY_DATASETS`, or a short
  alias such as ``moons``), drawn afresh with ``seed``;
- the name of an image set (:data:`~pyro_flowpack.data.images.IMAGE_DATASETS`), with its
  own train/test split;
- or the path of a tabular file (:func:`~pyro_flowpack.data.tabular.load_tabular`),
  shuffled with ``seed``, split, and standardised with the train split's statistics.

Names are matched without regard to case, and ``-`` counts as ``_`` (``Fashion-MNIST``
is ``fashion_mnist``); a known name wins over a file of the same name in the working
directory (write ``./digits`` for the file). Every split is deterministic in ``seed``, and the global random
state is neither read nor changed.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..checks import check_int
from .images import IMAGE_DATASETS, ImageDataset, image_dataset
from .tabular import SUPPORTED_SUFFIXES, Standardizer, check_columns, column_names, load_tabular
from .toy import TOY_DATASETS, toy_dataset

__all__ = ["DATA_ALIASES", "DATA_NAMES", "DataSplits", "load_data"]

DATA_ALIASES: dict[str, str] = {
    "moons": "two_moons",
    "spirals": "two_spirals",
    "8gaussians": "eight_gaussians",
    "gaussians": "eight_gaussians",
}

DATA_NAMES: list[str] = [*TOY_DATASETS, *DATA_ALIASES, *IMAGE_DATASETS]

DEFAULT_TOY_SIZE = 20000


@dataclass
class DataSplits:
    r"""A data set's train, validation and test splits, with what is needed to model it.

    Attributes:
        name: The data set's name (``"two_moons"``, ``"digits"``) or the file's path.
        kind: ``"toy"``, ``"tabular"`` or ``"image"``.
        train: The training split. Toy: ``float32`` of shape ``(N, 2)``; tabular:
            ``float32`` of shape ``(N, D)``, already standardised; image: integers of
            shape ``(N, C, H, W)`` in ``[0, num_bins)``, as :attr:`ImageDataset.images`.
        valid: The validation split, of the same kind (possibly empty).
        test: The test split, of the same kind (possibly empty).
        event_shape: The shape of one sample: ``(D,)`` or ``(C, H, W)``.
        num_bins: Images only: the number of levels a pixel can take.
        standardizer: Tabular only: the map fitted on the train split, whose
            :meth:`~pyro_flowpack.data.tabular.Standardizer.inverse` takes samples back
            to data units.
        labels: Images only: the class labels of each split, keyed ``"train"``,
            ``"valid"`` and ``"test"``.
        columns: Tabular only: the names of the modelled columns (the header's, else
            ``"column <i>"`` with the file's 0-based index).
        context: Tabular data with context columns: the standardised context of each
            split, keyed ``"train"``, ``"valid"`` and ``"test"``, one row per example.
        context_columns: The names of the context columns.
        context_standardizer: The map fitted on the train split's context.
        dequantized: Tabular data loaded with ``dequantize=True``: the names of the
            columns that hold only integers in every split, to be modelled as discrete
            values (possibly none).
    """

    name: str
    kind: str
    train: Tensor
    valid: Tensor
    test: Tensor
    event_shape: torch.Size
    num_bins: int | None = None
    standardizer: Standardizer | None = None
    labels: dict[str, Tensor] | None = None
    columns: list[str] | None = None
    context: dict[str, Tensor] | None = None
    context_columns: list[str] | None = None
    context_standardizer: Standardizer | None = None
    dequantized: list[str] | None = None

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(getattr(self, split))}" for split in ("train", "valid", "test"))
        return f"DataSplits(name={self.name!r}, kind={self.kind!r}, {sizes}, event_shape={tuple(self.event_shape)})"


def _canonical(spec: str) -> str | None:
    """The known data set's name that ``spec`` spells, or None."""
    name = spec.strip().lower().replace("-", "_")
    name = DATA_ALIASES.get(name, name)
    return name if name in TOY_DATASETS or name in IMAGE_DATASETS else None


def _is_path(spec: str) -> bool:
    return (
        os.sep in spec
        or (os.altsep is not None and os.altsep in spec)
        or spec.lower().endswith(SUPPORTED_SUFFIXES)
        or os.path.isfile(spec)
    )


def _sizes(n: int, valid_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """Rounds the split sizes (train, valid, test) of ``n`` items."""
    n_valid, n_test = round(valid_fraction * n), round(test_fraction * n)
    return n - n_valid - n_test, n_valid, n_test


def load_data(
    spec: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    size: int | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    key: str | None = None,
    columns: Sequence[str | int] | None = None,
    drop: Sequence[str | int] | None = None,
    context_columns: Sequence[str | int] | None = None,
    num_bins: int | None = None,
    dequantize: bool = False,
) -> DataSplits:
    r"""Loads the data set ``spec`` as train, validation and test splits.

    - Toy sets: ``size`` training points (20000 by default) and validation and test
      points in the ratio of the fractions, ``round(size * f / (1 - valid_fraction -
      test_fraction))`` each (2500 by default), all drawn in one call with ``seed`` and
      cut into three disjoint slices. A different ``seed`` gives different points.
    - Tabular files: the rows are shuffled by a permutation seeded with ``seed``; the
      first ``round(test_fraction * N)`` go to the test split, the next
      ``round(valid_fraction * N)`` to the validation split, the rest to the train split,
      whose mean and standard deviation standardise all three. ``size``, if given, keeps
      at most that many training rows (before standardising). A column holding only
      integers in the train split is flagged with a :class:`UserWarning`: a density over
      real numbers is not the likelihood of discrete values. With ``dequantize=True``
      the columns holding only integers in every split are named in
      :attr:`DataSplits.dequantized` instead, for a flow that ends in a
      :class:`~pyro_flowpack.transforms.ColumnDequantization` layer.
    - Image sets: the data set's own train and test splits (digits: its fixed split);
      a seeded ``valid_fraction`` of the train images becomes the validation split and
      ``test_fraction`` is not used. ``size``, if given, keeps at most that many training
      images. ``mnist``, ``fashion_mnist`` and ``cifar10`` need ``root``.

    Arguments:
        spec: A name of :data:`DATA_NAMES` or the path of a tabular file (anything with a
            path separator or a supported suffix, or an existing file).
        root: The directory of the torchvision image sets.
        download: Whether to download a torchvision image set into ``root``.
        seed: The seed of the toy draw, of the tabular shuffle and of the image
            validation split.
        size: The number of training points of a toy set; an upper bound on the training
            split of the others (``None``: all of it).
        valid_fraction: The fraction of the data in the validation split, in ``[0, 1)``.
        test_fraction: The fraction in the test split (toy and tabular data).
        key: The array of an ``.npz`` file or the tensor of a ``.pt`` dict to read.
        columns: Tabular files: the columns to model, by header name or 0-based index
            (default: all but ``drop`` and ``context_columns``).
        drop: Tabular files: columns to leave out (a row index saved by pandas, say).
        context_columns: Tabular files: columns to condition on, for a density
            :math:`p(x \mid c)`; standardised like the others, with their own statistics.
        num_bins: Makes a ``.npy``, ``.npz`` or ``.pt`` file of integer images
            ``(N, C, H, W)`` with values in ``[0, num_bins)`` an image data set, shuffled
            with ``seed`` and split like a table (no standardisation).
        dequantize: Tabular files: whether to mark the integer-valued columns for
            dequantization (see above) rather than warn about them.

    Returns:
        The splits, with their event shape and, by kind, ``num_bins``, ``labels`` or the
        ``standardizer``.

    Raises:
        ValueError: If ``spec`` is neither a known name nor a path, or an argument is out
            of range; :func:`~pyro_flowpack.data.tabular.load_tabular`'s errors for files.
        FileNotFoundError: If a tabular file or a torchvision data set is missing.

    Example:
        >>> data = load_data("moons", size=1000, seed=1)
        >>> data
        DataSplits(name='two_moons', kind='toy', train=1000, valid=125, test=125, event_shape=(2,))
        >>> images = load_data("digits")
        >>> images.train.shape, images.num_bins
        (torch.Size([1294, 1, 8, 8]), 17)
    """
    seed = check_int(seed, "load_data: seed", minimum=None)
    if size is not None:
        size = check_int(size, "load_data: size (or None)")
    for name, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= fraction < 1:
            raise ValueError(f"load_data: {name} must lie in [0, 1), got {fraction!r}")
    if valid_fraction + test_fraction >= 1:
        raise ValueError(
            "load_data: valid_fraction + test_fraction must be below 1 to leave a train split, "
            f"got {valid_fraction!r} + {test_fraction!r}"
        )
    text = os.fspath(spec)
    if not isinstance(text, str):
        raise ValueError(f"load_data: spec must be a data set name or a path, got {spec!r}")
    name = None if not isinstance(spec, str) else _canonical(text)
    if dequantize and (name is not None or num_bins is not None):
        what = f"the data set {name!r}" if name is not None else "image files"
        raise ValueError(f"load_data: dequantize applies only to tabular files, not to {what} (image flows "
                         "dequantize their pixels themselves)")
    if name is None:
        if not _is_path(text):
            raise ValueError(
                f"unknown data set {text!r}: neither a known name nor an existing file; known names are "
                f"{', '.join(DATA_NAMES)}, or give the path of a {'/'.join(SUPPORTED_SUFFIXES)} file"
            )
        if num_bins is not None:
            if columns is not None or drop is not None or context_columns is not None:
                raise ValueError("load_data: columns, drop and context_columns apply to tables, not to image files")
            return _image_file(text, key, num_bins, seed, size, valid_fraction, test_fraction)
        return _tabular(text, key, seed, size, valid_fraction, test_fraction, columns, drop, context_columns,
                        dequantize)
    if num_bins is not None:
        raise ValueError(f"load_data: num_bins applies only to image files, not to the data set {name!r} "
                         "(which knows its own)")
    if columns is not None or drop is not None or context_columns is not None:
        raise ValueError(f"load_data: columns, drop and context_columns apply only to tabular files, not to the "
                         f"data set {name!r}")
    if key is not None:
        raise ValueError(f"load_data: key={key!r} applies only to .npz and .pt files, not to the data set {name!r}")
    generator = torch.Generator().manual_seed(seed)
    if name in TOY_DATASETS:
        return _toy(name, seed, size, valid_fraction, test_fraction)
    return _images(name, root, download, generator, size, valid_fraction)


def _toy(name: str, seed: int, size: int | None, valid_fraction: float, test_fraction: float) -> DataSplits:
    n_train = DEFAULT_TOY_SIZE if size is None else size
    share = n_train / (1 - valid_fraction - test_fraction)
    n_valid, n_test = round(valid_fraction * share), round(test_fraction * share)
    points = toy_dataset(name, n_train + n_valid + n_test, seed).to(torch.float32)
    train, valid, test = points.split([n_train, n_valid, n_test])
    return DataSplits(name, "toy", train, valid, test, event_shape=torch.Size([2]))


def _column_index(spec: str | int, names: list[str] | None, width: int, path: str) -> int:
    """The 0-based index of a column given by header name or by index."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        index = spec
    elif names is not None and spec in names:
        return names.index(spec)
    elif isinstance(spec, str) and spec.strip().lstrip("-").isdigit():
        index = int(spec)
    else:
        known = f"the header's names are {', '.join(map(repr, names))}" if names else "the file has no header"
        raise ValueError(f"{path}: no column {spec!r}; {known}, or give a 0-based index below {width}")
    if not 0 <= index < width:
        raise ValueError(f"{path}: column index {index} is out of range: the file has {width} columns (0 to "
                         f"{width - 1})")
    return index


def _select(path: str, width: int, names: list[str] | None, columns, drop, context_columns):
    """The indices of the modelled and of the context columns."""
    def indices(specs):
        return [] if specs is None else [_column_index(c, names, width, path) for c in specs]

    chosen, dropped, context = indices(columns), set(indices(drop)), indices(context_columns)
    if columns is None:
        chosen = [j for j in range(width) if j not in dropped and j not in context]
    label = (lambda j: names[j]) if names else (lambda j: f"column {j}")
    described = (lambda j: f"{names[j]!r} (column {j}, counted from 0)") if names else (lambda j: f"{j} (counted from 0)")
    for group, members in (("columns", chosen), ("context_columns", context)):
        repeated = sorted({label(j) for j in members if members.count(j) > 1})
        if repeated:
            raise ValueError(f"{path}: {group} names a column twice: {', '.join(repeated)}")
    clash = sorted({label(j) for j in chosen if j in context or j in dropped} | {label(j) for j in context if j in dropped})
    if clash:
        raise ValueError(f"{path}: a column cannot be modelled, a context and dropped at once: {', '.join(clash)}")
    if not chosen:
        raise ValueError(f"{path}: no column left to model out of {width}")
    return (chosen, context, [label(j) for j in chosen], [label(j) for j in context],
            [described(j) for j in chosen], [described(j) for j in context])


def _integer_columns(x: Tensor, names: list[str]) -> list[str]:
    return [names[j] for j in range(x.shape[1]) if bool((x[:, j] == x[:, j].round()).all())]


def _tabular(
    path: str, key: str | None, seed: int, size: int | None, valid_fraction: float, test_fraction: float,
    columns=None, drop=None, context_columns=None, dequantize: bool = False,
) -> DataSplits:
    table = load_tabular(path, key=key)
    header = column_names(path)
    if header is not None and len(header) != table.shape[1]:
        header = None
    chosen, context, names, context_names, labels, context_labels = _select(
        path, table.shape[1], header, columns, drop, context_columns)
    x = table[:, chosen]
    n_train, n_valid, n_test = _sizes(len(x), valid_fraction, test_fraction)
    if n_train < 2:
        raise ValueError(
            f"{path}: {len(x)} rows leave {n_train} for the train split after valid_fraction="
            f"{valid_fraction!r} and test_fraction={test_fraction!r}; at least 2 are needed"
        )
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    pieces = order.split([n_test, n_valid, n_train])
    if size is not None:
        pieces = (pieces[0], pieces[1], pieces[2][:size])
    test, valid, train = (x[index] for index in pieces)
    # standardised in the file's precision (float64 for text), then cast for training
    check_columns(train, torch.float32, labels, f"the train split of {path}")
    # dequantized columns must be integers in every split, so that every row has a cell
    dequantized = _integer_columns(torch.cat([train, valid, test]), names) if dequantize else None
    integers = [name for name in _integer_columns(train, names) if name not in (dequantized or [])]
    if integers:
        hint = ("; they are not dequantized: other splits hold non-integers there" if dequantize
                else "; dequantize=True (flowpack train --dequantize) models them as discrete values")
        warnings.warn(
            f"{path}: {len(integers)} column(s) hold only integers ({', '.join(map(repr, integers[:5]))}"
            f"{', ...' if len(integers) > 5 else ''}): a flow is a density over real numbers, so its NLL there is "
            f"not the likelihood of the discrete values{hint}", UserWarning, stacklevel=3)
    if dequantize and not dequantized:
        warnings.warn(f"{path}: dequantize=True, but no column holds only integers in every split: nothing is "
                      "dequantized", UserWarning, stacklevel=3)
    standardizer = Standardizer.fit(train)
    splits = [standardizer.transform(split).to(torch.float32) for split in (train, valid, test)]
    extra: dict = {}
    if context:
        c = table[:, context]
        c_test, c_valid, c_train = (c[index] for index in pieces)
        check_columns(c_train, torch.float32, context_labels, f"the context of the train split of {path}")
        context_standardizer = Standardizer.fit(c_train)
        extra = {
            "context": {name: context_standardizer.transform(part).to(torch.float32)
                        for name, part in (("train", c_train), ("valid", c_valid), ("test", c_test))},
            "context_columns": context_names,
            "context_standardizer": context_standardizer,
        }
    return DataSplits(path, "tabular", *splits, event_shape=x.shape[1:], standardizer=standardizer,
                      columns=names, dequantized=dequantized, **extra)


def _image_file(path: str, key: str | None, num_bins: int, seed: int, size: int | None, valid_fraction: float,
                test_fraction: float) -> DataSplits:
    """A user's file of integer images (N, C, H, W), split like a table."""
    from pathlib import Path

    from .tabular import _read_numpy, _read_pt

    file = Path(path).expanduser()
    if file.suffix.lower() not in (".npy", ".npz", ".pt"):
        raise ValueError(f"{path}: image files must be .npy, .npz or .pt, got {file.suffix or 'no suffix'!r}")
    if not file.is_file():
        raise FileNotFoundError(f"image data: no such file: {file}")
    array = _read_pt(file, key) if file.suffix.lower() == ".pt" else _read_numpy(file, key)
    images = torch.as_tensor(array)
    dataset = ImageDataset(images, torch.zeros(len(images), dtype=torch.long), num_bins, name=str(path))
    n_train, n_valid, n_test = _sizes(len(images), valid_fraction, test_fraction)
    if n_train < 1:
        raise ValueError(f"{path}: {len(images)} images leave none for the train split")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, valid, train = (dataset.images[index] for index in order.split([n_test, n_valid, n_train]))
    if size is not None:
        train = train[:size]
    return DataSplits(path, "image", train, valid, test, event_shape=dataset.shape, num_bins=num_bins)


def _images(
    name: str,
    root: str | os.PathLike[str] | None,
    download: bool,
    generator: torch.Generator,
    size: int | None,
    valid_fraction: float,
) -> DataSplits:
    train = image_dataset(name, root, "train", download)
    test = image_dataset(name, root, "test", download)
    order = torch.randperm(len(train), generator=generator)
    n_valid = round(valid_fraction * len(train))
    valid_index, train_index = order.split([n_valid, len(train) - n_valid])
    if size is not None:
        train_index = train_index[:size]
    # Each split keeps the data set's order.
    valid_index, train_index = valid_index.sort().values, train_index.sort().values
    return DataSplits(
        name,
        "image",
        train.images[train_index],
        train.images[valid_index],
        test.images,
        event_shape=train.shape,
        num_bins=train.num_bins,
        labels={"train": train.labels[train_index], "valid": train.labels[valid_index], "test": test.labels},
    )
