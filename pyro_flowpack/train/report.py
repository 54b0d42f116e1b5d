r"""What a finished run reports: its metrics on a split and its pictures, computed the same
way for the ``flowpack`` command and for Python users (``pf.train.evaluate_split``,
``pf.train.run_pictures``)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..data.splits import DataSplits
from ..flow import Flow
from .distributed import Distributed
from .loop import evaluate_iw_nll, evaluate_nll, read_metrics

__all__ = ["evaluate_split", "summary_text", "picture_title", "sampled_title", "header_names", "run_pictures",
           "data_units_shift", "RUN_PICTURES"]

#: The pictures of a run folder.
RUN_PICTURES = ("loss.png", "density.png", "samples.png")


def evaluate_split(flow: Flow, data: DataSplits, split: str = "test", k: int = 8,
                   distributed: Distributed | None = None, iw: bool = True) -> dict[str, Any]:
    r"""The metrics of ``flow`` (as trained, on ``data``'s units) on one split of ``data``,
    as ``flowpack train`` and ``flowpack evaluate`` report them.

    Tabular data: ``nll`` (nats per example, standardised) and ``nll_data_units`` (in the
    file's units; with ``bound`` and ``dequantized`` when integer columns were
    dequantized); a conditional run is scored on each example's own context. Images:
    ``nll_bound_nats``, ``bpd_bound`` and, with ``iw``, the importance-weighted ``bpd_iw``
    with ``k`` draws.

    Raises:
        ValueError: If the split is empty.

    Example:
        >>> from pyro_flowpack.data import load_data
        >>> data = load_data("moons", size=200)
        >>> evaluate_split(pf.flows.NSF(2), data)["unit"]
        'nats'
    """
    x = getattr(data, split)
    if len(x) == 0:
        raise ValueError(f"the {split} split of {data.name} is empty")
    nll = evaluate_nll(flow, x, 1024, distributed, context=(data.context or {}).get(split))
    summary: dict[str, Any] = {"data": data.name, "split": split, "examples": len(x)}
    if data.kind == "image":
        dims = data.event_shape.numel()
        summary.update({"unit": "bits/dim", "nll_bound_nats": nll, "bpd_bound": nll / (dims * math.log(2))})
        if iw:
            summary.update({"k": k, "bpd_iw": evaluate_iw_nll(flow, x, k) / (dims * math.log(2))})
    else:
        summary.update({"unit": "nats", "nll": nll})
        if data.standardizer is not None:
            summary["nll_data_units"] = nll + data_units_shift(data)
            if data.dequantized:
                summary.update({"bound": True, "dequantized": list(data.dequantized)})
    return summary


def data_units_shift(data: DataSplits) -> float:
    r"""What the NLL gains from standardised to data units: :math:`\sum_j \log \sigma_j` over
    the columns with a density (the probability of a dequantized column has no units)."""
    if not data.dequantized:
        return data.standardizer.log_abs_det().item()
    return sum(math.log(s) for s, c in zip(data.standardizer.std.tolist(), data.columns) if c not in data.dequantized)


def summary_text(summary: dict[str, Any]) -> str:
    """One line that says what :func:`evaluate_split` measured."""
    where = f"{summary['split']} split of {summary['data']} ({summary['examples']} examples)"
    if summary["unit"] == "bits/dim":
        text = f"{where}: {summary['bpd_bound']:.4f} bits/dim (bound)"
        if "bpd_iw" in summary:
            text += f", {summary['bpd_iw']:.4f} bits/dim (importance-weighted, k={summary['k']})"
        return text
    text = f"{where}: NLL {summary['nll']:.4f} nats"
    if "nll_data_units" in summary:
        text += f" (standardised); {summary['nll_data_units']:.4f} nats in the units of the file"
    if summary.get("bound"):
        text += f" (an upper bound: {', '.join(map(repr, summary['dequantized']))} dequantized)"
    return text


def picture_title(data_name: str | None, flow_name: str | None, summary: dict[str, Any] | None) -> str:
    """What a picture shows: the data set (a file by its name), the flow and, if known, its
    test NLL (tabular: also in data units) or bits/dim."""
    parts = [Path(data_name).name if data_name else None, flow_name]
    if summary:
        if summary["unit"] == "bits/dim":
            nll = f"{summary['split']} {summary['bpd_bound']:.4f} bits/dim (bound)"
            if "bpd_iw" in summary:
                nll += f", {summary['bpd_iw']:.4f} (importance-weighted, k={summary['k']})"
        else:
            nll = f"{summary['split']} NLL {summary['nll']:.4f} nats"
            if "nll_data_units" in summary:
                nll += f" (standardised), {summary['nll_data_units']:.4f} nats in data units"
            if summary.get("bound"):
                nll += " (bound)"
        parts.append(nll)
    return " | ".join(p for p in parts if p)


def header_names(path: str | None, columns: list[str] | None, features: int) -> list[str] | None:
    """The CSV header's names of the modelled columns (``columns``, the run's selection, or
    all), for axis labels; ``None`` for a file without a header."""
    from ..data import column_names

    header = column_names(path) if path else None
    names = header if header is None or columns is None else columns
    return list(names) if names is not None and len(names) == features else None


def sampled_title(title: str, temperature: float) -> str:
    """``title`` for a picture of samples drawn at ``temperature``."""
    return " | ".join(p for p in (title, f"samples at T={temperature:g}") if p)


def run_pictures(flow: Flow, data: DataSplits, out: str | os.PathLike[str], temperature: float = 0.7,
                 unit: str = "nats", title: str = "") -> list[Path]:
    r"""Draws a run's pictures into its folder ``out``, titled ``title``: ``loss.png`` (the
    learning curve from ``metrics.jsonl``) and a picture of the model in the data's units:
    ``density.png`` for 2-D data (density and samples), ``samples.png`` otherwise (an image
    grid at ``temperature``, or a scatter matrix of samples against the test rows, one
    draw per test context for a conditional run, axes named from the file's header).

    Returns:
        The paths written.
    """
    from .. import plots

    out = Path(out)

    loss_png, density_png, samples_png = (out / name for name in RUN_PICTURES)
    paths = [plots.loss_curve(read_metrics(out), loss_png, unit=unit, title=title)]
    flow.eval()
    context = (data.context or {}).get("test")

    def draw(n: int):  # a conditional flow: one draw for each of the first n test contexts
        if context is None:
            return flow().sample((n,))
        return flow(context[:n].to(next(flow.parameters()))).sample()

    with torch.no_grad():
        if data.kind == "image":
            samples = flow().sample((64,), temperature=temperature)
            paths.append(plots.image_grid(samples.cpu(), samples_png, num_bins=data.num_bins,
                                          title=sampled_title(title, temperature)))
        elif data.event_shape[0] == 2 and context is None and not data.dequantized:  # a density needs real columns
            samples = _to_data_units(flow().sample((len(data.test),)).cpu(), data)
            paths.append(plots.density_2d(_data_units_log_prob(flow, data), _to_data_units(data.test, data),
                                          density_png, samples=samples, title=sampled_title(title, 1.0)))
        else:
            samples = _to_data_units(draw(min(len(data.test), 2000)).cpu(), data)
            names = header_names(data.name, data.columns, samples.shape[1]) if data.kind == "tabular" else None
            paths.append(plots.scatter(samples, samples_png, data=_to_data_units(data.test[:2000], data), names=names,
                                       title=sampled_title(title, 1.0)))
    return paths


def _to_data_units(x, data):
    return data.standardizer.inverse(x) if data.standardizer is not None else x


def _data_units_log_prob(flow, data):
    """``log p(x)`` in the units of the data file (the standardised flow's density, moved)."""
    reference = next(flow.parameters())
    if data.standardizer is None:
        return lambda x: flow().log_prob(x.to(reference)).cpu()
    s = data.standardizer
    # standardised in double precision, then cast to the flow's dtype
    return lambda x: (flow().log_prob(s.transform(x.double()).to(reference)).cpu() - s.log_abs_det())
