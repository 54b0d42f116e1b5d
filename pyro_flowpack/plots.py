r"""Pictures of a run, written as PNG files: loss curves, 2-D densities and samples,
image grids and scatter plots.

Every function takes an optional ``title`` (what the picture shows: the data set, the
flow, its test NLL, the sampling temperature), drawn above the picture and also stored as
the PNG's ``Title`` text chunk, so that a program can read what a picture claims to show.

matplotlib is imported inside the functions, and only through
:class:`matplotlib.figure.Figure` with the Agg canvas, so importing this module costs
nothing and pyplot's global state (a user's notebook backend, open figures) is never
touched. Every file is written atomically with
:func:`pyro_flowpack.train.write_atomically`: a reader sees the old picture or the new
one, never a partly written file.

The heat map of a 2-D flow shows the learned density
:math:`p_X(x) = \exp \log p_X(x)` at the centres of a regular grid of cells, so that the
midpoint rule :math:`\sum_{ij} p_X(x_{ij}) \, \Delta x \, \Delta y` approximates
:math:`\int p_X = 1` when the bounds hold nearly all of the mass (see
:func:`density_grid`).
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.distributions import Distribution

from .checks import check_int
from .train import write_atomically

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["density_2d", "density_grid", "image_grid", "loss_curve", "scatter"]

Bounds = tuple[tuple[float, float], tuple[float, float]]

DPI = 100
_LARGE = 2000  # from this many points on, a 2-D histogram shows them better than dots
_TILE = 64  # small images are enlarged to at least this many pixels a side
_MOSAIC = 2048  # ... unless the grid would grow past this many pixels a side


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: "Figure", path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    title = " ".join(figure.get_suptitle().split())  # the drawn title, unwrapped
    metadata = {"Title": title} if title else None
    write_atomically(path, lambda p: figure.savefig(p, format="png", dpi=DPI, metadata=metadata))
    return path


def _title_lines(title: str | None, width: float) -> list[str]:
    r"""``title`` wrapped at spaces to lines of about ``width`` pixels (none without a title)."""
    return textwrap.wrap(" ".join(title.split()), max(8, int(width // 7))) if title else []  # ~7 px a character


def _title(figure: "Figure", title: str | None, width: float, **options: Any) -> None:
    r"""Draws ``title`` above the picture, wrapped to ``width`` pixels; :func:`_save`
    stores it in the PNG."""
    lines = _title_lines(title, width)
    if lines:
        figure.suptitle("\n".join(lines), fontsize=10, **options)


_LINE = 17  # pixels of one line of a 10-point title at DPI = 100


def _points(name: str, argument: str, x: Any, features: int | None = None) -> np.ndarray:
    r"""``x`` as a float64 array of shape ``(N, D)`` (``D = features`` if given)."""
    x = torch.as_tensor(x).detach()
    if x.dim() != 2 or (features is not None and x.shape[1] != features):
        expected = f"(N, {features})" if features is not None else "(N, D)"
        raise ValueError(f"{name}: {argument} must have shape {expected}, got {tuple(x.shape)}")
    return x.cpu().double().numpy()


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x).all(axis=1)]


def _number(value: Any) -> float | None:
    r"""``value`` as a finite float, or ``None`` (missing, NaN, infinite, not a number)."""
    if isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for index, record in enumerate(records):
        value = _number(record.get(key))
        step = _number(record.get("step", index))
        if value is not None and step is not None:
            steps.append(step)
            values.append(value)
    return steps, values


def loss_curve(
    records: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    *,
    unit: str = "nats",
    title: str | None = None,
) -> Path:
    r"""Plots the training and validation losses of a run against the step.

    The training loss (one value per logged step) is a thin light line, the validation
    loss (one value per epoch) a line with markers. Missing, NaN and infinite values
    are skipped. The top of the :math:`y` range is the 98th percentile of the values
    (raised to the last values if need be), so that the large losses of the first steps
    do not flatten the rest of the curve.

    Arguments:
        records: The run's metrics log: dicts with ``"step"`` and some of
            ``"train_loss"`` and ``"valid_loss"`` (other keys are ignored).
        path: The PNG file to write.
        unit: The unit of the losses, shown on the :math:`y` axis (``"nats"`` or
            ``"bits/dim"``).
        title: A title above the curves (e.g. the data set, the flow and its test NLL).

    Returns:
        The path written.

    Example:
        >>> import pathlib, tempfile
        >>> records = [{"step": s, "train_loss": 3.0 / (1 + s)} for s in range(50)]
        >>> records.append({"step": 49, "valid_loss": 0.1})
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "loss.png"
        >>> loss_curve(records, path).read_bytes()[:4]
        b'\x89PNG'
    """
    if isinstance(records, Mapping):
        raise ValueError("loss_curve: records must be a list of dicts (the metrics log), got one dict")
    records = list(records)
    for record in records:
        if not isinstance(record, Mapping):
            raise ValueError(f"loss_curve: each record must be a dict, got {type(record).__name__}")
    train = _series(records, "train_loss")
    valid = _series(records, "valid_loss")
    figure = _figure(6.4, 4.0)
    axes = figure.add_subplot()
    if train[0]:
        axes.plot(*train, color="tab:blue", alpha=0.45, linewidth=0.8, label="train")
    if valid[0]:
        axes.plot(*valid, color="tab:orange", marker="o", markersize=4, linewidth=1.2, label="validation")
    values = np.array(train[1] + valid[1])
    if values.size:
        low = values.min()
        high = max([np.percentile(values, 98.0)] + [series[1][-1] for series in (train, valid) if series[1]])
        margin = 0.05 * (high - low) if high > low else max(0.05 * abs(high), 0.5)
        axes.set_ylim(low - margin, high + margin)
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no finite loss values", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("step")
    axes.set_ylabel(f"negative log-likelihood ({unit})")
    axes.grid(alpha=0.3)
    _title(figure, title, 6.4 * DPI)
    figure.tight_layout()
    return _save(figure, path)


def _check_bounds(bounds: Any) -> Bounds:
    if isinstance(bounds, (int, float)) and not isinstance(bounds, bool) and bounds > 0:
        return ((-float(bounds), float(bounds)), (-float(bounds), float(bounds)))
    try:
        (x0, x1), (y0, y1) = bounds
        result = ((float(x0), float(x1)), (float(y0), float(y1)))
    except (TypeError, ValueError):
        result = None
    if result is None or not all(math.isfinite(v) for pair in result for v in pair) or not (
        result[0][0] < result[0][1] and result[1][0] < result[1][1]
    ):
        raise ValueError(
            "bounds must be ((xmin, xmax), (ymin, ymax)) with finite min < max, or a positive "
            f"float L for the square [-L, L]^2, got {bounds!r}"
        )
    return result


def _default_bounds(points: np.ndarray) -> Bounds:
    r"""The 0.5% to 99.5% quantiles of each coordinate, widened by 10% of their span."""
    points = _finite_rows(points)
    if len(points) == 0:
        return ((-4.0, 4.0), (-4.0, 4.0))
    low, high = np.quantile(points, [0.005, 0.995], axis=0)
    span = np.where(high > low, high - low, 1.0)
    low, high = low - 0.1 * span, high + 0.1 * span
    return ((float(low[0]), float(high[0])), (float(low[1]), float(high[1])))


def density_grid(
    log_prob: Callable[[Tensor], Tensor],
    bounds: Bounds | float,
    grid: int = 200,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Evaluates a 2-D density :math:`p(x, y) = \exp \log p(x, y)` at the centres of
    ``grid`` :math:`\times` ``grid`` equal cells covering ``bounds``.

    With cell widths :math:`\Delta x, \Delta y`, the midpoint rule
    :math:`\sum_{ij} p(x_j, y_i) \, \Delta x \, \Delta y` approximates the mass of the
    density inside the bounds. Non-finite log densities are shown as zero density.

    Arguments:
        log_prob: A function mapping points of shape ``(N, 2)`` to log densities ``(N,)``.
        bounds: ``((xmin, xmax), (ymin, ymax))``, or ``L`` for :math:`[-L, L]^2`.
        grid: The number of cells along each axis.
        dtype: The dtype of the points passed to ``log_prob``.
        device: The device of the points passed to ``log_prob``.

    Returns:
        The cell centres ``xs`` and ``ys`` of shape ``(grid,)`` and the densities
        ``values`` of shape ``(grid, grid)``, on the CPU, with ``values[i, j]`` the
        density at ``(xs[j], ys[i])`` (rows are :math:`y`, as an image).

    Example:
        >>> normal = torch.distributions.MultivariateNormal(torch.zeros(2), torch.eye(2))
        >>> xs, ys, values = density_grid(normal.log_prob, 6.0, grid=100)
        >>> mass = values.sum() * (xs[1] - xs[0]) * (ys[1] - ys[0])
        >>> round(float(mass), 3)
        1.0
    """
    (x0, x1), (y0, y1) = _check_bounds(bounds)
    grid = check_int(grid, "density_grid: grid", minimum=2)
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    xs, ys = x0 + (x1 - x0) * centres, y0 + (y1 - y0) * centres
    points = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    points = points.to(dtype=dtype, device=device)
    with torch.no_grad():
        log_values = torch.cat([log_prob(chunk).reshape(-1) for chunk in points.split(16384)])
    if log_values.shape != (grid * grid,):
        raise ValueError(
            f"density_grid: log_prob must map points of shape (N, 2) to shape (N,), "
            f"got {tuple(log_values.shape)} for N = {grid * grid}"
        )
    log_values = log_values.detach().double().cpu()
    values = torch.where(torch.isfinite(log_values), log_values.exp(), torch.zeros_like(log_values))
    values = torch.nan_to_num(values, nan=0.0, posinf=0.0)
    return xs, ys, values.reshape(grid, grid)


def _show_points(axes: "Axes", points: np.ndarray, bounds: Bounds, title: str) -> None:
    points = _finite_rows(points)
    if len(points) >= _LARGE:
        bins = min(100, round(math.sqrt(len(points)) / 2))  # about 4 points a bin or more
        axes.hist2d(points[:, 0], points[:, 1], bins=bins, range=bounds, cmap="viridis")
    else:
        axes.set_facecolor("#fafafa")
        axes.scatter(points[:, 0], points[:, 1], s=3, alpha=0.5, color="tab:blue", linewidths=0)
    axes.set_title(title)


def _flow_parts(flow_or_log_prob: Any, context: Tensor | None) -> tuple[Callable, Callable | None, Any]:
    r"""The log density, a sampler (or ``None``) and a reference tensor for the dtype."""
    if isinstance(flow_or_log_prob, nn.Module):
        reference = next(iter(list(flow_or_log_prob.parameters()) + list(flow_or_log_prob.buffers())), None)
        distribution = flow_or_log_prob(context)
        return distribution.log_prob, distribution.sample, reference
    if isinstance(flow_or_log_prob, Distribution):
        return flow_or_log_prob.log_prob, flow_or_log_prob.sample, None
    if callable(flow_or_log_prob):
        if context is not None:
            raise ValueError("density_2d: context is only used with a Flow; got a callable and a context")
        return flow_or_log_prob, None, None
    raise TypeError(
        "density_2d: expected a Flow, a Distribution or a callable mapping (N, 2) points to log "
        f"densities, got {type(flow_or_log_prob).__name__}"
    )


def density_2d(
    flow_or_log_prob: nn.Module | Distribution | Callable[[Tensor], Tensor],
    data: Tensor,
    path: str | os.PathLike[str],
    *,
    samples: Tensor | None = None,
    bounds: Bounds | float | None = None,
    grid: int = 200,
    context: Tensor | None = None,
    title: str | None = None,
) -> Path:
    r"""Draws three panels side by side: the data, samples of the flow, and the learned
    density :math:`\exp \log p_X(x)` as a heat map (see :func:`density_grid`).

    Points are drawn as dots, or as a 2-D histogram from 2000 points on. All panels
    share the same bounds. A flow is evaluated in eval mode without gradients, and its
    train/eval mode is restored afterwards.

    Arguments:
        flow_or_log_prob: A :class:`~pyro_flowpack.Flow` (called as ``flow(context)``),
            a distribution, or a function mapping points ``(N, 2)`` to log densities
            ``(N,)`` (e.g. a wrapper that undoes a standardisation of the data).
        data: The data, of shape ``(N, 2)``.
        path: The PNG file to write.
        samples: Samples of shape ``(M, 2)`` (default: ``N`` samples drawn from the flow;
            required with a plain function).
        bounds: ``((xmin, xmax), (ymin, ymax))`` or ``L`` for :math:`[-L, L]^2`
            (default: the 0.5% and 99.5% quantiles of the data, widened by 10%).
        grid: The number of heat-map cells along each axis.
        context: The context of a conditional flow, of shape ``(C,)``.
        title: A title above the panels (e.g. the data set, the flow, its test NLL and
            the temperature of the samples).

    Returns:
        The path written.

    Example:
        >>> import pathlib, tempfile
        >>> flow = pf.flows.RealNVP(features=2, transforms=2, hidden=(8,))
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "density.png"
        >>> density_2d(flow, torch.randn(100, 2), path, grid=20).read_bytes()[:4]
        b'\x89PNG'
    """
    data_np = _points("density_2d", "data", data, features=2)
    bounds = _default_bounds(data_np) if bounds is None else _check_bounds(bounds)
    module = flow_or_log_prob if isinstance(flow_or_log_prob, nn.Module) else None
    training = module.training if module is not None else False
    try:
        if module is not None:
            module.eval()
        with torch.no_grad():
            log_prob, sample, reference = _flow_parts(flow_or_log_prob, context)
            if reference is None:
                reference = torch.as_tensor(data)
            dtype = reference.dtype if reference.is_floating_point() else torch.get_default_dtype()
            if samples is None:
                if sample is None:
                    raise ValueError("density_2d: pass samples= when giving a log-density function, not a flow")
                samples = sample((len(data_np),))
            samples_np = _points("density_2d", "samples", samples, features=2)
            xs, ys, values = density_grid(log_prob, bounds, grid, dtype=dtype, device=reference.device)
    finally:
        if module is not None:
            module.train(training)
    figure = _figure(13.5, 4.5)
    panels = figure.subplots(1, 3)
    _show_points(panels[0], data_np, bounds, f"data ({len(data_np)})")
    _show_points(panels[1], samples_np, bounds, f"samples ({len(samples_np)})")
    (x0, x1), (y0, y1) = bounds
    image = panels[2].imshow(values.numpy(), origin="lower", extent=(x0, x1, y0, y1), cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=panels[2], fraction=0.046, pad=0.04)
    panels[2].set_title("learned density")
    for axes in panels:
        axes.set_xlim(x0, x1)
        axes.set_ylim(y0, y1)
        axes.set_box_aspect(1.0)
    _title(figure, title, 13.5 * DPI)
    figure.tight_layout()
    return _save(figure, path)


def _image_array(images: Any, num_bins: int | None) -> np.ndarray:
    r"""Images ``(N, C, H, W)`` as floats in :math:`[0, 1]`, channels last."""
    images = torch.as_tensor(images).detach().cpu()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid: images must have shape (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("image_grid: got no images (N = 0)")
    if num_bins is None and not images.is_floating_point():
        if images.dtype != torch.uint8:
            raise ValueError(f"image_grid: integer images of dtype {images.dtype} need num_bins")
        num_bins = 256
    if num_bins is not None:
        num_bins = check_int(num_bins, "image_grid: num_bins", minimum=2)
        low, high = float(images.min()), float(images.max())
        if low < 0 or high > num_bins - 1:
            raise ValueError(f"image_grid: pixel values must lie in [0, {num_bins}), got [{low:g}, {high:g}]")
        images = images.double() / (num_bins - 1)
    images = torch.nan_to_num(images.double(), nan=0.0).clamp(0.0, 1.0)
    return images.permute(0, 2, 3, 1).numpy()


def image_grid(
    images: Tensor,
    path: str | os.PathLike[str],
    *,
    num_bins: int | None = None,
    nrow: int | None = None,
    title: str | None = None,
) -> Path:
    r"""Draws images as a grid without axes, small images enlarged by an integer factor
    (nearest neighbour, so that pixels stay sharp).

    Arguments:
        images: Images of shape ``(N, C, H, W)``, ``C = 1`` (grey) or 3 (RGB): levels in
            ``[0, num_bins)`` when ``num_bins`` is given (8-bit ``uint8`` images need
            none), otherwise floats in :math:`[0, 1]` (clamped).
        path: The PNG file to write.
        num_bins: The number of levels a pixel can take (e.g. 256, 17 for digits).
        nrow: Images per row (default: :math:`\lceil \sqrt{N} \rceil`, a square-ish grid).
        title: A title in a band above the grid (e.g. the data set, the flow, its test
            bits/dim and the temperature); the grid keeps its size in pixels.

    Returns:
        The path written.

    Example:
        >>> import pathlib, tempfile
        >>> images = torch.randint(0, 17, (10, 1, 8, 8))
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "samples.png"
        >>> image_grid(images, path, num_bins=17).read_bytes()[:4]
        b'\x89PNG'
    """
    array = _image_array(images, num_bins)
    n, height, width, channels = array.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    nrow = check_int(nrow, "image_grid: nrow")
    columns = min(nrow, n)
    rows = math.ceil(n / columns)
    pad = 1
    mosaic = np.ones((rows * (height + pad) + pad, columns * (width + pad) + pad, channels))
    for index in range(n):
        top = pad + (index // columns) * (height + pad)
        left = pad + (index % columns) * (width + pad)
        mosaic[top : top + height, left : left + width] = array[index]
    scale = max(1, min(math.ceil(_TILE / max(height, width)), _MOSAIC // max(mosaic.shape[:2])))
    mosaic = mosaic.repeat(scale, axis=0).repeat(scale, axis=1)
    height, width = mosaic.shape[:2]
    figure = _figure(width / DPI, height / DPI)
    lines = len(_title_lines(title, width))
    band = _LINE * lines + 8 if lines else 0  # pixels above the grid, so that the grid keeps its size
    figure.set_size_inches(width / DPI, (height + band) / DPI)
    _title(figure, title, width, y=1.0 - 4 / (height + band), va="top")
    axes = figure.add_axes((0.0, 0.0, 1.0, height / (height + band)))
    axes.axis("off")
    if channels == 1:
        axes.imshow(mosaic[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        axes.imshow(mosaic, interpolation="nearest")
    return _save(figure, path)


def _shared_edges(sets: list[tuple[str, np.ndarray, str]], dim: int, bins: int) -> np.ndarray:
    r"""Histogram bin edges shared by all point sets, so that their bars line up."""
    return np.histogram_bin_edges(np.concatenate([points[:, dim] for _, points, _ in sets]), bins=bins)


def scatter(
    samples: Tensor,
    path: str | os.PathLike[str],
    *,
    data: Tensor | None = None,
    max_dims: int = 4,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    r"""Draws samples as points: one scatter plot in 2-D, a histogram in 1-D, and a
    pairwise scatter matrix of the first ``max_dims`` coordinates (histograms on the
    diagonal) in more dimensions. Data, if given, is overlaid in another colour. When
    only some coordinates are shown, the title says which (``features 1-4 of 12``).

    Arguments:
        samples: Samples of shape ``(N, D)``.
        path: The PNG file to write.
        data: Data of shape ``(M, D)`` to compare with.
        max_dims: The most coordinates shown in the scatter matrix.
        names: The names of the ``D`` coordinates for the axis labels (e.g. a CSV
            file's header; default :math:`x_1, \dots, x_D`).
        title: A title above the plots (e.g. the data set, the flow, its test NLL and
            the temperature of the samples).

    Returns:
        The path written.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "samples.png"
        >>> scatter(torch.randn(200, 3), path, data=torch.randn(100, 3)).read_bytes()[:4]
        b'\x89PNG'
    """
    samples_np = _finite_rows(_points("scatter", "samples", samples))
    features = samples_np.shape[1]
    sets = [("samples", samples_np, "tab:blue")]
    if data is not None:
        sets.insert(0, ("data", _finite_rows(_points("scatter", "data", data, features=features)), "tab:orange"))
    max_dims = check_int(max_dims, "scatter: max_dims")
    k = min(features, max_dims)
    if k == 0:
        raise ValueError(f"scatter: samples must have at least one feature, got shape {tuple(samples_np.shape)}")
    if names is not None and (isinstance(names, str) or len(names) != features):
        raise ValueError(f"scatter: names must be a list of {features} names (one a feature), got {names!r}")
    # mathtext would read a $ in a header name
    labels = [str(n).replace("$", r"\$") for n in names] if names is not None else [
        f"$x_{{{i + 1}}}$" for i in range(features)]
    if k < features:
        shown = f"feature 1 of {features}" if k == 1 else f"features 1-{k} of {features}"
        title = f"{title} | {shown}" if title else shown
    if k <= 2:
        figure = _figure(5.0, 5.0)
        axes = figure.add_subplot()
        edges = _shared_edges(sets, 0, 50) if k == 1 else None
        for label, points, colour in sets:
            if k == 1:
                axes.hist(points[:, 0], bins=edges, density=True, alpha=0.5, color=colour, label=label)
            else:
                axes.scatter(points[:, 0], points[:, 1], s=4, alpha=0.5, color=colour, linewidths=0, label=label)
        axes.set_xlabel(labels[0])
        axes.set_ylabel("density" if k == 1 else labels[1])
        axes.legend()
    else:
        figure = _figure(2.2 * k, 2.2 * k)
        grid = figure.subplots(k, k, squeeze=False)
        for i in range(k):
            for j in range(k):
                axes = grid[i, j]
                edges = _shared_edges(sets, i, 40) if i == j else None
                for label, points, colour in sets:
                    if i == j:
                        axes.hist(points[:, i], bins=edges, density=True, alpha=0.5, color=colour, label=label)
                    else:
                        axes.scatter(points[:, j], points[:, i], s=2, alpha=0.4, color=colour, linewidths=0)
                axes.tick_params(labelsize=6)
                if i == k - 1:
                    axes.set_xlabel(labels[j])
                if j == 0:
                    axes.set_ylabel(labels[i])
        grid[0, 0].legend(fontsize=6)
    _title(figure, title, figure.get_figwidth() * DPI)
    figure.tight_layout()
    return _save(figure, path)
