r"""Runs by name: the flows the ``flowpack`` command can build, and reloading a run folder.

A run folder written by ``flowpack train`` (or by :func:`~pyro_flowpack.train.fit` with
``metadata={"flow": {"name": ..., "options": ...}, "event_shape": ..., "num_bins": ...}``)
holds its checkpoints, and each checkpoint holds the name and options of its flow, so
:func:`load_run` rebuilds the trained flow from the folder alone.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..flow import Flow
from ..flows.registry import FLOWS, FlowEntry, flow_entry
from ..data.tabular import Standardizer
from ..transforms.dequantization import ColumnDequantization
from ..transforms.elementwise import ElementwiseAffine
from ..transforms.support import Support
from .folder import RunFolder

__all__ = ["VECTOR_FLOWS", "IMAGE_FLOWS", "build_flow", "with_column_dequantization", "with_support", "Run", "load_run",
           "RawUnitsFlow"]

#: The flows for vectors ``(D,)`` and for images ``(C, H, W)`` by name: the two kinds of
#: the one registry :data:`pyro_flowpack.flows.FLOWS`.
VECTOR_FLOWS: dict[str, FlowEntry] = FLOWS["vector"]
IMAGE_FLOWS: dict[str, FlowEntry] = FLOWS["image"]

# the command line's name of an image builder's option
_COMMAND_NAMES = {"depth": "steps"}


def build_flow(name: str, event_shape: Sequence[int], *, num_bins: int | None = None, context: int = 0,
               **options: Any) -> Flow:
    r"""Builds the flow ``name`` of the registry (:data:`~pyro_flowpack.flows.FLOWS`) for
    events of ``event_shape``: a vector flow for ``(D,)``, an image flow for
    ``(C, H, W)`` with ``num_bins`` levels per pixel.

    ``options`` are those of the flow's builder (``flow_entry(name).options()``), for
    instance ``transforms``, ``hidden`` and ``bins`` for ``"nsf"``; an option the flow
    does not take is an error. ``depth`` is the command line's name of an image flow's
    ``steps``.

    Example:
        >>> build_flow("nsf", (2,), transforms=2, hidden=(16,)).event_shape
        torch.Size([2])
        >>> build_flow("glow", (1, 8, 8), num_bins=17, depth=1, hidden_channels=8).event_shape
        torch.Size([1, 8, 8])
        >>> build_flow("maf", (2,), bins=8)
        Traceback (most recent call last):
        ...
        TypeError: flow 'maf' takes no option(s) bins; its options are bound, hidden, transforms
    """
    shape = tuple(int(s) for s in event_shape)
    if len(shape) == 1:
        if "hidden" in options:
            options["hidden"] = tuple(options["hidden"])
        return flow_entry(name, "vector").build(shape[0], context, **options)
    if len(shape) == 3:
        entry = flow_entry(name, "image")
        if num_bins is None:
            raise ValueError("image flows need num_bins, the number of levels of a pixel")
        options = {_COMMAND_NAMES.get(k, k): v for k, v in options.items()}
        return entry.build(shape, context, num_bins=num_bins, **options)
    raise ValueError(f"flows are built for vectors (D,) or images (C, H, W), got event shape {shape}")


def with_column_dequantization(flow: Flow, columns: Sequence[bool], standardizer: Standardizer) -> Flow:
    r"""The vector flow ``flow``, for data standardised by ``standardizer``, followed by a
    :class:`~pyro_flowpack.transforms.ColumnDequantization` of the integer-valued
    ``columns`` (booleans, one per feature), on the grid of the integers standardised.

    Its ``log_prob`` of a standardised row is a one-sample lower bound on the log of the
    probability of the row's integer columns times the density of the others in
    standardised units; in the data's units the bound is that plus :math:`\sum_j \log
    \sigma_j` over the other columns only.

    Example:
        >>> s = Standardizer(torch.tensor([3.0, 0.0]).double(), torch.tensor([2.0, 1.0]).double())
        >>> flow = with_column_dequantization(build_flow("maf", (2,), transforms=1, hidden=(8,)), [True, False], s)
        >>> flow().log_prob(torch.tensor([[0.5, 0.3]])).shape  # the integer 4, standardised
        torch.Size([1])
    """
    layer = ColumnDequantization(torch.as_tensor(columns, dtype=torch.bool), standardizer.mean, standardizer.std)
    return Flow([flow.transform, layer.to(flow.base().mean.dtype)], flow.base_argument())


def with_support(flow: Flow, supports: Sequence[Any], standardizer: Standardizer | None = None) -> Flow:
    r"""The vector flow ``flow`` followed by a :class:`~pyro_flowpack.transforms.Support`
    layer, so that it is a proper density on the product of ``supports`` (one spec per
    feature, as :func:`~pyro_flowpack.transforms.parse_support` returns them), given in
    the data's units: for data standardised by ``standardizer``, :math:`z = (x - \mu) /
    \sigma`, the bounds :math:`(a, b)` become :math:`((a - \mu) / \sigma, (b - \mu) /
    \sigma)`, so that the flow on :math:`z` followed by the map back to :math:`x` puts no
    mass outside :math:`(a, b)`.

    Example:
        >>> s = Standardizer(torch.tensor([3.0]).double(), torch.tensor([2.0]).double())
        >>> flow = with_support(build_flow("maf", (1,), transforms=1, hidden=(8,)), ["positive"], s)
        >>> flow.transform[-1].supports  # x > 0 is z > -1.5
        [(-1.5, inf)]
    """
    raw = Support(supports)
    low, high = raw.low.double(), raw.high.double()
    if standardizer is not None:
        low, high = standardizer.transform(low), standardizer.transform(high)
    layer = Support([(float(a), float(b)) for a, b in zip(low, high)])
    return Flow([flow.transform, layer.to(flow.base().mean.dtype)], flow.base_argument())


@dataclass
class Run:
    r"""A trained run reloaded from its folder.

    Attributes:
        flow: The flow in the units of the data file, in eval mode: for a tabular run the
            trained model followed by the exact map back from standardised units,
            :math:`x = \mu + \sigma \odot z` (an
            :class:`~pyro_flowpack.transforms.ElementwiseAffine`), in ``float64`` so that
            columns such as :math:`10^7 + 0.1\,\varepsilon` keep their precision; its
            ``log_prob`` takes raw rows and its samples are raw rows. A run trained with
            dequantized columns ends instead in a
            :class:`~pyro_flowpack.transforms.ColumnDequantization` on the integers
            themselves, after the map: ``log_prob`` is the bound in the data's units
            and samples hold exact integers there. For other runs, the model itself.
        model: The flow as it was trained (on standardised data for a tabular run).
        checkpoint: The checkpoint's content (``state``, ``config``, ``metadata``, ...).
        path: The checkpoint file.
    """

    flow: Flow
    model: Flow
    checkpoint: dict[str, Any]
    path: Path

    @property
    def metadata(self) -> dict[str, Any]:
        """What the run saved to rebuild itself: ``flow``, ``data``, ``event_shape``, ..."""
        return self.checkpoint["metadata"]


def load_run(run: str | os.PathLike[str], which: str = "best", map_location: Any = "cpu") -> Run:
    r"""Reloads the flow of a run folder from its ``best`` or ``last`` checkpoint.

    The checkpoint's ``metadata`` must hold ``flow`` (``{"name": ..., "options": ...}``),
    ``event_shape`` and, for images, ``num_bins``, as ``flowpack train`` writes them, and
    for tabular data the ``standardizer``, which :attr:`Run.flow` folds in so that it is a
    density over the file's rows.

    Raises:
        FileNotFoundError: If the folder or the checkpoint is missing.
        ValueError: If the checkpoint does not say how to rebuild its flow.

    Example:
        >>> import numpy, tempfile
        >>> from pyro_flowpack.cli import main
        >>> folder = tempfile.mkdtemp()
        >>> rows = 1e7 + 0.1 * numpy.random.default_rng(0).standard_normal((300, 1))
        >>> numpy.save(f"{folder}/big.npy", rows)
        >>> main(["train", "--data", f"{folder}/big.npy", "--out", f"{folder}/run", "--epochs", "1",
        ...       "--transforms", "1", "--hidden", "8", "--no-progress"])  # doctest: +ELLIPSIS
        flowpack: training ...
        0
        >>> run = load_run(f"{folder}/run")
        >>> run.flow().log_prob(torch.tensor(rows[:3])).shape  # raw rows, in the file's units
        torch.Size([3])
        >>> abs(float(run.flow().sample((1000,)).mean()) - 1e7) < 1.0  # samples in the file's units
        True
    """
    folder = RunFolder(run)
    checkpoint = folder.load(which, map_location=map_location)  # best falls back to last without validation
    path = folder.file(which if which == "last" or folder.file("best").exists() else "last")
    metadata = checkpoint.get("metadata") or {}
    if "flow" not in metadata or "event_shape" not in metadata:
        raise ValueError(f"{path} does not say how to rebuild its flow (no 'flow'/'event_shape' metadata)")
    name, shape = metadata["flow"]["name"], metadata["event_shape"]
    accepted = flow_entry(name, "vector" if len(shape) == 1 else "image").options()
    # runs of earlier versions saved every command-line flow option, also those their flow ignored
    options = {k: v for k, v in metadata["flow"].get("options", {}).items() if _COMMAND_NAMES.get(k, k) in accepted}
    model = build_flow(name, shape, num_bins=metadata.get("num_bins"),
                       context=len(metadata.get("context_columns") or []), **options)
    standardizer = metadata.get("standardizer")
    standardizer = Standardizer.from_state_dict(standardizer) if standardizer is not None else None
    dequantized = metadata.get("dequantized")
    if dequantized:
        model = with_column_dequantization(model, [c in dequantized for c in metadata["columns"]], standardizer)
    if metadata.get("support"):
        model = with_support(model, metadata["support"], standardizer)
    model.load_state_dict(checkpoint["model"])
    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    model.to(device).eval()
    flow = model
    if standardizer is not None:
        back = ElementwiseAffine(standardizer.mean, standardizer.std)
        context = metadata.get("context_standardizer")
        context = Standardizer.from_state_dict(context) if context is not None else None
        if dequantized:  # the same bound, with the noise drawn on the integers themselves
            layers, dequantization = model.transform.parts
            parts = [copy.deepcopy(layers), back, ColumnDequantization(dequantization.columns.cpu())]
        else:
            parts = [copy.deepcopy(model.transform), back]
        flow = RawUnitsFlow(parts, model.base(), context)
        flow = flow.double().to(device).eval()
    return Run(flow, model, checkpoint, path)


class RawUnitsFlow(Flow):
    r"""A flow over a data file's raw rows: a trained flow followed by the standardiser's
    exact affine map, and, for a conditional run, called with raw context rows, which it
    standardises with the training statistics before the layers see them.

    Arguments:
        transforms: The layers, base side first (the last one maps back to data units).
        base: The base distribution.
        context: The standardiser of the context columns (``None``: unconditional).
    """

    def __init__(self, transforms: Sequence[Any], base: Any, context: Standardizer | None = None) -> None:
        super().__init__(transforms, base)
        self.context_standardizer = context

    def forward(self, context: torch.Tensor | None = None) -> Any:
        """The distribution of raw rows, given raw context rows of shape ``(..., C)``."""
        if context is not None and self.context_standardizer is not None:
            if context.dim() < 1 or context.shape[-1] != self.context_standardizer.features:
                raise ValueError(f"RawUnitsFlow expects context rows of {self.context_standardizer.features} "
                                 f"columns, got shape {tuple(context.shape)}")
            context = self.context_standardizer.transform(context.double()).to(self.base().mean.dtype)
        return super().forward(context)
