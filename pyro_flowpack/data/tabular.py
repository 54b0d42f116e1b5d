r"""Tabular data from a user's file, and the standardisation that flows train on.

:func:`load_tabular` reads a matrix of samples, one row per sample and one column per
feature, from a ``.npy``, ``.npz``, ``.csv`` or ``.pt`` file and returns it in the file's
precision (``float64`` for text, integers and ``float64`` arrays), as a tensor of shape
``(N, D)``. Everything that would otherwise surface as an
obscure failure in the middle of training is checked here, with a message that names
the file and the offending place: a missing file, an unsupported suffix, an array that
is not two-dimensional, fewer than two rows, NaN or infinite values, and non-numeric
CSV fields.

:class:`Standardizer` is the affine map :math:`z = (x - \mu) / \sigma` fitted on the
training split. A flow is fitted to :math:`z`; its density in data units follows from
the change of variables

.. math:: \log p_X(x) = \log p_Z\big((x - \mu) / \sigma\big) - \sum_j \log \sigma_j ,

and samples return to data units through :meth:`Standardizer.inverse`. The statistics
travel in a checkpoint through :meth:`Standardizer.state_dict`. Statistics and both maps
are computed in double precision, so that a column such as :math:`10^7 + 0.1\,\varepsilon`
keeps its spread: cast to ``float32`` first, it would keep a handful of distinct values.
:func:`check_columns` refuses the columns a flow cannot be fitted to: constant ones, and
those whose standardised values would collapse when cast to the training precision (an
enormous outlier squeezes every other value of its column together).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["SUPPORTED_SUFFIXES", "Standardizer", "load_tabular", "check_columns", "column_names"]

SUPPORTED_SUFFIXES = (".npy", ".npz", ".csv", ".pt")


class Standardizer:
    r"""The per-feature affine map :math:`z = (x - \mu) / \sigma` and its inverse.

    :meth:`fit` takes the mean and the (population) standard deviation of each column;
    a constant column, which has no spread to divide by and whose density has no finite
    maximum, is refused. The statistics are kept in double precision; :meth:`transform`
    computes in double precision and returns the input's dtype (standardised values are
    of order one), :meth:`inverse` returns double precision (data units may need it).

    Arguments:
        mean: The mean :math:`\mu`, of shape ``(D,)``.
        std: The scale :math:`\sigma`, of shape ``(D,)``, positive and finite.

    Example:
        >>> x = torch.tensor([[1.0, 10.0], [3.0, 20.0], [5.0, 30.0]], dtype=torch.float64)
        >>> standardizer = Standardizer.fit(x)
        >>> standardizer.mean, standardizer.std
        (tensor([ 3., 20.], dtype=torch.float64), tensor([1.6330, 8.1650], dtype=torch.float64))
        >>> z = standardizer.transform(x)
        >>> z[:, 0]
        tensor([-1.2247,  0.0000,  1.2247], dtype=torch.float64)
        >>> torch.allclose(standardizer.inverse(z), x)
        True
        >>> standardizer.log_abs_det()  # log(1.6330) + log(8.1650)
        tensor(2.5903, dtype=torch.float64)
    """

    def __init__(self, mean: Tensor, std: Tensor):
        mean, std = torch.as_tensor(mean), torch.as_tensor(std)
        if mean.dim() != 1 or std.shape != mean.shape or not mean.dtype.is_floating_point:
            raise ValueError(
                "Standardizer: mean and std must be floating tensors of the same shape (D,), "
                f"got mean {mean.dtype} {tuple(mean.shape)} and std {std.dtype} {tuple(std.shape)}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError("Standardizer: mean must be finite and std finite and positive, got "
                             f"mean={mean.tolist()}, std={std.tolist()}")
        self.mean = mean.double()
        self.std = std.double()

    @property
    def features(self) -> int:
        r"""The number :math:`D` of features."""
        return self.mean.numel()

    @classmethod
    def fit(cls, x: Tensor) -> Standardizer:
        r"""Fits the mean and standard deviation of each column of ``x``.

        The statistics are computed and kept in double precision. The standard deviation
        is the population one (divisor :math:`N`), so that the standardised ``x`` has mean
        0 and standard deviation 1 exactly in that sense.

        Arguments:
            x: The training samples, a floating tensor of shape ``(N, D)``, finite, with
                no constant column.

        Returns:
            The fitted standardizer.

        Raises:
            ValueError: If a column is constant (it names the first one).
        """
        if x.dim() != 2 or not x.dtype.is_floating_point or len(x) < 1:
            raise ValueError(
                f"Standardizer.fit: x must be a floating tensor of shape (N, D) with N >= 1, "
                f"got {x.dtype} of shape {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError("Standardizer.fit: x holds NaN or infinite values")
        wide = x.double()
        constant = (wide.amax(0) == wide.amin(0)).nonzero().flatten().tolist()
        if constant:
            raise ValueError(
                f"Standardizer.fit: column {constant[0]} (counted from 0) is constant (every row is "
                f"{wide[0, constant[0]].item()!r}); a flow has no density to fit there: drop it"
            )
        return cls(wide.mean(0), wide.std(0, correction=0))

    def _check(self, x: Tensor, name: str) -> None:
        if x.dim() < 1 or x.shape[-1] != self.features:
            raise ValueError(
                f"Standardizer.{name}: expected a tensor of shape (..., {self.features}), "
                f"got shape {tuple(x.shape)}"
            )

    def transform(self, x: Tensor) -> Tensor:
        r"""Returns :math:`z = (x - \mu) / \sigma`, from data units to standard units.

        Arguments:
            x: Samples of shape ``(..., D)``, on any device; the statistics follow it. The
                result has ``x``'s dtype, computed in double precision.
        """
        self._check(x, "transform")
        wide = x.to(torch.float64)
        return ((wide - self.mean.to(wide.device)) / self.std.to(wide.device)).to(x.dtype)

    def inverse(self, z: Tensor) -> Tensor:
        r"""Returns :math:`x = z \sigma + \mu`, from standard units back to data units.

        Arguments:
            z: Standardised samples of shape ``(..., D)``, on any device.

        Returns:
            The samples in data units, in double precision (a column such as
            :math:`10^7 + 0.1\,\varepsilon` needs it).
        """
        self._check(z, "inverse")
        wide = z.to(torch.float64)
        return wide * self.std.to(wide.device) + self.mean.to(wide.device)

    def log_abs_det(self) -> Tensor:
        r"""Returns :math:`\sum_j \log \sigma_j`, the log-determinant of :meth:`inverse`.

        :meth:`inverse` runs in the sampling direction (standard units to data units),
        like a flow's forward map, so the density in data units is
        ``log_prob_data(x) = log_prob_standard(transform(x)) - log_abs_det()``.
        """
        return self.std.log().sum()

    def state_dict(self) -> dict[str, Tensor]:
        r"""Returns ``{"mean": ..., "std": ...}``, to be saved with a checkpoint."""
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> Standardizer:
        r"""Rebuilds a standardizer from :meth:`state_dict`'s output.

        Example:
            >>> s = Standardizer.fit(torch.randn(100, 3, dtype=torch.float64))
            >>> t = Standardizer.from_state_dict(s.state_dict())
            >>> torch.equal(t.mean, s.mean) and torch.equal(t.std, s.std)
            True
        """
        if not isinstance(state, dict) or set(state) != {"mean", "std"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"Standardizer.from_state_dict: expected a dict with keys 'mean' and 'std', got {keys}")
        return cls(state["mean"], state["std"])

    def __repr__(self) -> str:
        return f"Standardizer(features={self.features})"


def load_tabular(path: str | os.PathLike[str], *, key: str | None = None) -> Tensor:
    r"""Reads a data matrix, one sample per row, from a ``.npy``, ``.npz``, ``.csv`` or
    ``.pt`` file.

    - ``.npy``: one array (saved with :func:`numpy.save`; pickled objects are refused).
    - ``.npz``: the array called ``key``, or the only array in the archive.
    - ``.csv``: comma-separated numbers. The first line is a header, and skipped, when
      none of its fields reads as a number; every other field must be a number.
    - ``.pt``: a tensor saved with :func:`torch.save`, or a dict holding the tensor
      called ``key`` or a single tensor (loaded with ``weights_only=True``).

    Integer and floating data are accepted, in the file's precision: ``float64`` for CSV
    text, integer and ``float64`` arrays, ``float32`` for ``float32`` (and half-precision)
    arrays; booleans, complex numbers and strings are not. A one-dimensional array is
    refused rather than guessed to be one feature or one sample.

    Arguments:
        path: The file.
        key: The name of the array in an ``.npz`` archive or of the tensor in a ``.pt``
            dict; needed only when the file holds several.

    Returns:
        The samples, a ``float64`` or ``float32`` tensor of shape ``(N, D)`` with
        ``N >= 2``, finite.

    Raises:
        FileNotFoundError: If there is no such file.
        ValueError: If the suffix is not supported, the array is not two-dimensional, it
            has fewer than two rows or no column, it holds NaN or infinite values, a CSV
            field is not a number, or it is not clear which array of the file to read.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "data.csv")
        >>> with open(path, "w") as f:
        ...     _ = f.write("height,weight\n1.80,75\n1.65,60\n1.72,68\n")
        >>> load_tabular(path)
        tensor([[ 1.8000, 75.0000],
                [ 1.6500, 60.0000],
                [ 1.7200, 68.0000]], dtype=torch.float64)
        >>> column_names(path)
        ['height', 'weight']
    """
    path = Path(os.fspath(path)).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"unsupported tabular file {str(path)!r}: the suffix must be one of "
            f"{', '.join(SUPPORTED_SUFFIXES)}, got {path.suffix or 'none'!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"tabular data: no such file: {path}")
    if key is not None and suffix not in (".npz", ".pt"):
        raise ValueError(f"{path}: key={key!r} applies only to .npz and .pt files, not to {suffix}")
    if suffix in (".npy", ".npz"):
        array = _read_numpy(path, key)
    elif suffix == ".csv":
        array = _read_csv(path)
    else:
        array = _read_pt(path, key)
    return _checked(path, array)


def _pick(path: Path, what: str, keys: list[str], key: str | None) -> str:
    """The key to read: ``key`` if given (and present), else the only one."""
    if key is not None:
        if key not in keys:
            raise ValueError(f"{path}: no {what} called {key!r}; the file holds {', '.join(map(repr, keys))}")
        return key
    if len(keys) != 1:
        listed = ", ".join(map(repr, keys)) if keys else "none"
        raise ValueError(f"{path}: holds {len(keys)} {what}s ({listed}); choose one with key=...")
    return keys[0]


def _read_numpy(path: Path, key: str | None) -> np.ndarray:
    try:
        content = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: could not be read as a NumPy {path.suffix} file (pickled objects are refused): {error}"
        ) from error
    if isinstance(content, np.ndarray):
        return content
    with content:
        return content[_pick(path, "array", list(content.files), key)]


def _read_pt(path: Path, key: str | None) -> Tensor:
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file it cannot unpickle
        raise ValueError(
            f"{path}: could not be read as a tensor saved with torch.save "
            f"(only tensors and dicts of tensors are loaded): {error}"
        ) from error
    if isinstance(content, dict):
        tensors = {str(name): value for name, value in content.items() if isinstance(value, Tensor)}
        if key is not None and key in content and not isinstance(content[key], Tensor):
            raise ValueError(f"{path}: {key!r} holds a {type(content[key]).__name__}, not a tensor")
        content = tensors[_pick(path, "tensor", list(tensors), key)]
    elif key is not None:
        raise ValueError(f"{path}: key={key!r} given, but the file holds a {type(content).__name__}, not a dict")
    if not isinstance(content, Tensor):
        raise ValueError(f"{path}: expected a tensor or a dict of tensors, got a {type(content).__name__}")
    return content


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _read_csv(path: Path) -> np.ndarray:
    """Parses the CSV with NumPy's fast reader; if that fails, walks the file to report the
    first field that is not a number (or the first row with the wrong number of fields)."""
    with open(path, newline="", encoding="utf-8-sig") as file:
        first = next((row for row in csv.reader(file) if row), None)
    if first is None:
        raise ValueError(f"{path}: the CSV file is empty")
    header = None if any(_is_number(field) for field in first) else [field.strip() for field in first]
    try:
        return np.loadtxt(
            path,
            delimiter=",",
            quotechar='"',
            skiprows=int(header is not None),
            ndmin=2,
            dtype=np.float64,
            encoding="utf-8-sig",
        )
    except ValueError as error:
        _diagnose_csv(path, header, len(first))
        raise ValueError(f"{path}: could not be read as comma-separated numbers: {error}") from error


def _diagnose_csv(path: Path, header: list[str] | None, width: int) -> None:
    """Raises a ValueError naming the first bad line and field of the CSV file."""
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        if header is not None:
            next(reader)
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != width:
                raise ValueError(f"{path}: line {line} has {len(row)} fields, expected {width} (as in the first line)")
            for column, field in enumerate(row):
                if not _is_number(field):
                    name = f"{header[column]!r} (column {column + 1})" if header else f"{column + 1}"
                    value = "an empty field" if not field.strip() else f"{field!r}"
                    note = "" if header else " (a header line would have no numeric field)"
                    if any(separator in field.strip() for separator in ";\t "):
                        note += " (fields must be separated by commas)"
                    raise ValueError(
                        f"{path}: column {name} is not numeric: line {line} holds {value}{note}; "
                        "every field must be a number"
                    )


def _checked(path: Path, array: np.ndarray | Tensor) -> Tensor:
    """Converts to a floating tensor in the file's precision, checking the dtype, the
    shape and the values."""
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "iuf":
            raise ValueError(f"{path}: expected a numeric (integer or floating) array, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    else:
        tensor = array
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise ValueError(f"{path}: expected a numeric (integer or floating) tensor, got dtype {tensor.dtype}")
    if tensor.dim() == 1:
        raise ValueError(
            f"{path}: expected a 2-D array (N samples, D features), got a 1-D array of shape "
            f"{tuple(tensor.shape)}; reshape it before saving: x.reshape(-1, 1) for N samples of "
            "one feature, or x.reshape(1, -1) for one sample"
        )
    if tensor.dim() != 2:
        images = " (integer images (N, C, H, W) need num_bins, flowpack's --num-bins)" if tensor.dim() == 4 else ""
        raise ValueError(
            f"{path}: expected a 2-D array (N samples, D features), got shape {tuple(tensor.shape)}{images}; "
            "flatten the features first, e.g. x.reshape(len(x), -1)"
        )
    rows, columns = tensor.shape
    if rows < 2 or columns < 1:
        raise ValueError(
            f"{path}: expected at least 2 samples (rows) and 1 feature (column), got shape {(rows, columns)}"
        )
    wide = tensor.dtype == torch.float64 or not tensor.dtype.is_floating_point
    tensor = tensor.to(torch.float64 if wide else torch.float32)
    bad = ~torch.isfinite(tensor)
    count = int(bad.sum())
    if count:
        row, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{path}: {count} of the {tensor.numel()} values are NaN or infinite; the first is at row "
            f"{row}, column {column} (counted from 0), value {array[row, column].item()!r}; remove or "
            "impute them first"
        )
    return tensor.contiguous()


def column_names(path: str | os.PathLike[str]) -> list[str] | None:
    """The names in a CSV file's header line, or ``None`` (no header, or not a CSV file)."""
    path = Path(os.fspath(path)).expanduser()
    if path.suffix.lower() != ".csv" or not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8-sig") as file:
        first = next((row for row in csv.reader(file) if row), None)
    if first is None or any(_is_number(field) for field in first):
        return None
    return [field.strip() for field in first]


def _column(index: int, names: list[str] | None) -> str:
    return names[index] if names else f"{index} (counted from 0)"


def check_columns(x: Tensor, dtype: torch.dtype = torch.float32, names: list[str] | None = None,
                  what: str = "the data") -> None:
    r"""Refuses, with a message naming the column, a column of ``x`` that a flow trained
    in ``dtype`` cannot be fitted to:

    * a constant column (its density has no finite maximum: the NLL would fall without
      bound);
    * a column whose standardised values, cast to ``dtype``, keep fewer than 99% of the
      column's distinct values, or fewer than 2 (a huge outlier squeezes the other
      values of its column together, or the column varies below ``dtype``'s resolution).

    Arguments:
        x: The samples, ``(N, D)``, in the file's precision.
        dtype: The precision the flow is trained in.
        names: How the messages name each column (e.g. ``"'price' (column 3, counted from 0)"``).
        what: What ``x`` is, for the messages (e.g. ``"the train split of data.csv"``).

    Example:
        >>> x = torch.tensor([[1e7, 1.0], [1e7 + 0.1, 2.0], [1e7 + 0.2, 3.0]], dtype=torch.float64)
        >>> check_columns(x)  # standardised in float64 first: the 0.1 steps survive float32
        >>> check_columns(torch.tensor([[1.0, 5.0], [2.0, 5.0]]), names=["'a' (column 0, counted from 0)",
        ...                                                          "'b' (column 1, counted from 0)"])
        Traceback (most recent call last):
            ...
        ValueError: column 'b' (column 1, counted from 0) of the data is constant (every row is 5.0); drop it
    """
    wide = x.to(torch.float64)
    for j in range(wide.shape[1]):
        column = wide[:, j]
        low, high = column.min(), column.max()
        if low == high:
            raise ValueError(f"column {_column(j, names)} of {what} is constant (every row is {low.item()!r}); "
                             "drop it")
        distinct = column.unique().numel()
        z = ((column - column.mean()) / column.std(correction=0)).to(dtype)
        kept = z.unique().numel()
        if kept < 2 or kept < 0.99 * distinct:
            raise ValueError(
                f"column {_column(j, names)} of {what}: standardised and cast to {dtype}, its {distinct} "
                f"distinct values become {kept} (range {low.item():.6g} to {high.item():.6g}, mean "
                f"{column.mean().item():.6g}); an outlier may squeeze the others together: remove it or "
                "drop the column"
            )

