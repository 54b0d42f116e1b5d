r"""Multimodal variational inference: a mixture of flows against one-component guides
under one mass-covering objective, on the three-mode mixture of ``bench/vi.py``.

Target: ``bench/vi.py``'s ``mixture`` (imported, not copied): three equally weighted 2-D
Gaussians of standard deviation 0.5 at the corners of a triangle of circumradius 3,
:math:`\log Z = \log(3 \cdot 2\pi \cdot 0.25)`, written as a standard normal site ``z``
corrected by a ``pyro.factor``.

Guides (:data:`GUIDES`):

- ``AutoFlowGuide-K3``: ``pf.infer.AutoFlowGuide(model, components=3)``, a mixture of
  three flows, each the library's default (affine IAF layers, ``stl=True``);
- ``AutoFlowGuide-K3-total``: the same with ``stl=False``, an ablation;
- ``AutoFlowGuide`` (one flow of the components' affine layers, ``splines=0, stl=True``: in 2-D
  the default would otherwise end every block with a spline), Pyro's ``AutoNormal`` and ``AutoIAFNormal``.

Losses (:data:`LOSSES`), the same two objectives for every guide: ``SIWAE``
(:math:`\mathrm{SIWAE}_T` with :math:`T` particles per component for a mixture, the
importance-weighted bound :math:`\mathrm{IWAE}_{KT}` for a one-component guide) and
``StratifiedELBO`` (the mixture's ELBO from :math:`T` draws per component; for a
one-component guide ``Trace_ELBO`` with :math:`K T` vectorised particles): every guide
makes :math:`K T` model evaluations per step. With ``stl=True`` our guides' gradient is
the path estimate, with ``stl=False`` and for Pyro's guides the total derivative (see
``pf.infer.SIWAE``). :data:`CONFIGS` lists the (guide, loss) pairs of a default run.

The flows share depth and hidden sizes (``--transforms``, ``--hidden``).

Protocol. For each guide and seed: ``pyro.clear_param_store()``,
``pyro.set_rng_seed(seed)``, the guide is built and called once, then trained for
``--steps`` steps of the loss (``--beta0`` and ``--anneal-steps`` for tempering, the same
for every guide) with ``torch.optim.Adam`` at ``--lr`` decayed exponentially to
``--lr / 10`` at the last step. A step whose loss is not finite makes no update and is
counted. Then, under ``torch.no_grad()`` with the seed reset, ``pf.infer.diagnose`` of
``--eval-particles`` i.i.d. draws of the guide (a mixture draws its component, and
:math:`\log q` is the mixture's density) gives the KL gap
:math:`\log Z - \mathrm{ELBO}`, with :math:`\mathrm{ELBO} = \frac1S \sum_s \log w_s`, the
importance-sampling error :math:`|\log \hat Z - \log Z|`, the Pareto :math:`\hat k` and
the effective sample size; and "modes" counts the modes that receive at least 20% of
the draws within 2 standard deviations of their centre (the exact posterior puts
:math:`(1 - e^{-2}) / 3 = 28.8\%` there). Tables show mean ± sd over
seeds. Validation is off during the runs for all guides alike.

Goals (issue 13): ``AutoFlowGuide-K3`` reaches a gap of at most 0.05 nats and an IS
error of at most 0.02 (judged on the mean over seeds, and stated for the worst seed).

Run (one thread)::

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/vi_multimodal.py \
        --json vi_multimodal.json --rst vi_multimodal.rst
    .venv/bin/python bench/vi_multimodal.py --seeds 0 --steps 100 --configs AutoFlowGuide-K3/SIWAE AutoNormal/SIWAE
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

import pyro_flowpack as pf
from pyro_flowpack.train import write_atomically

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ scripts share vi.py and tables.py
from tables import markdown, rst  # noqa: E402
from vi import MIXTURE_MEANS, MIXTURE_SCALE, TARGETS  # noqa: E402

__all__ = ["GUIDES", "LOSSES", "CONFIGS", "GOALS", "fit", "evaluate", "run", "summarise", "main"]

TARGET = TARGETS["mixture"]
#: ``name: (builder(model, transforms, hidden, components), components, description)``.
GUIDES: dict[str, tuple[Callable[..., Any], int, str]] = {
    "AutoFlowGuide-K3": (
        lambda model, transforms, hidden, k: pf.infer.AutoFlowGuide(model, components=k, transforms=transforms,
                                                                    hidden=hidden),
        3, "pf.infer.AutoFlowGuide(model, components=3): path estimate (stl=True)"),
    "AutoFlowGuide-K3-total": (
        lambda model, transforms, hidden, k: pf.infer.AutoFlowGuide(model, components=k, stl=False,
                                                                    transforms=transforms, hidden=hidden),
        3, "the same with stl=False: total-derivative estimate (ablation)"),
    "AutoFlowGuide": (
        lambda model, transforms, hidden, k: pf.infer.AutoFlowGuide(model, transforms=transforms, hidden=hidden,
                                                                    splines=0, stl=True),
        1, "pf.infer.AutoFlowGuide(model, splines=0, stl=True), one flow of the components' affine layers: "
           "path estimate"),
    "AutoNormal": (lambda model, transforms, hidden, k: AutoNormal(model), 1, "Pyro AutoNormal: total derivative"),
    "AutoIAFNormal": (
        lambda model, transforms, hidden, k: AutoIAFNormal(model, hidden_dim=list(hidden), num_transforms=transforms),
        1, "Pyro AutoIAFNormal: total derivative"),
}
#: The objectives, each a ``pf.infer`` loss class.
LOSSES: dict[str, type] = {"SIWAE": pf.infer.SIWAE, "StratifiedELBO": pf.infer.StratifiedELBO}
#: The (guide, loss) pairs of a default run.
CONFIGS: list[tuple[str, str]] = [
    ("AutoFlowGuide-K3", "SIWAE"), ("AutoFlowGuide-K3", "StratifiedELBO"), ("AutoFlowGuide-K3-total", "SIWAE"),
    ("AutoFlowGuide", "SIWAE"), ("AutoFlowGuide", "StratifiedELBO"),
    ("AutoNormal", "SIWAE"), ("AutoNormal", "StratifiedELBO"),
    ("AutoIAFNormal", "SIWAE"), ("AutoIAFNormal", "StratifiedELBO"),
]
OURS = "AutoFlowGuide-K3"
#: The goals on ``OURS`` (each of its losses): the largest mean gap and mean IS error.
GOALS = {"gap": 0.05, "is_error": 0.02}


def fit(guide: Any, loss: Any, steps: int, lr: float) -> dict[str, Any]:
    """Trains ``guide`` on the target with ``loss`` and Adam decaying from ``lr`` to ``lr / 10``."""
    guide()
    parameters = [p for p in guide.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.1 ** (1 / max(steps - 1, 1)))
    skipped = 0
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        value = loss.differentiable_loss(TARGET.model, guide)
        if torch.isfinite(value):
            value.backward()
            optimizer.step()
        else:
            skipped += 1
        schedule.step()
    return {"train_seconds": time.perf_counter() - start, "skipped": skipped,
            "parameters": sum(p.numel() for p in parameters)}


@torch.no_grad()
def evaluate(guide: Any, particles: int) -> dict[str, Any]:
    r"""The diagnostics of ``particles`` draws, the gap and IS error against the exact
    :math:`\log Z`, and the modes covered."""
    d = pf.infer.diagnose(TARGET.model, guide, num_particles=particles, max_plate_nesting=0)
    z = Predictive(TARGET.model, guide=guide, num_samples=particles, parallel=True,
                   return_sites=["z"])()["z"].reshape(-1, 2)
    near = ((z.unsqueeze(-2) - MIXTURE_MEANS).norm(dim=-1) < 2 * MIXTURE_SCALE).double().mean(0)
    return {**d.as_dict(), "gap": TARGET.log_z - d.elbo, "is_error": abs(d.log_z - TARGET.log_z),
            "mode_shares": near.tolist(), "modes": int((near >= 0.2).sum())}


def run(guide_name: str, loss_name: str, seed: int, steps: int, particles: int, lr: float, eval_particles: int,
        transforms: int, hidden: tuple[int, ...], beta0: float, anneal_steps: int) -> dict[str, Any]:
    """Builds, trains and evaluates one guide with one loss and one seed; a one-component
    guide gets ``K * particles`` particles, ``K`` the components of ours."""
    make, components, _ = GUIDES[guide_name]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    k = GUIDES[OURS][1]
    guide = make(TARGET.model, transforms, hidden, k)
    per_component = particles if components > 1 else k * particles
    loss = LOSSES[loss_name](num_particles=per_component, max_plate_nesting=0, beta0=beta0, anneal_steps=anneal_steps)
    with pyro.validation_enabled(False):
        training = fit(guide, loss, steps, lr)
        pyro.set_rng_seed(seed + 10_000)
        result = evaluate(guide, eval_particles)
    return {"guide": guide_name, "loss": loss_name, "seed": seed, "log_z": TARGET.log_z,
            "loss_particles": per_component, "components": components, "eval_particles": eval_particles,
            **training, **result}


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.2g}"


def _mean_sd(values: Sequence[float], digits: int = 3) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        if not finite:
            return "diverged"
        return f"{_number(statistics.mean(finite), digits)} ({len(values) - len(finite)} inf)"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{_number(statistics.mean(values), digits)} ± {_number(sd, digits)}"


def summarise(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]], list[str]]:
    """The table (header, rows) and one line per goal and loss of ours saying whether it is met."""
    header = ["guide", "loss", "particles", "gap", "IS error", "k-hat", "ESS %", "modes", "train s"]
    rows, lines = [], []
    for guide, loss in dict.fromkeys((r["guide"], r["loss"]) for r in results):
        mine = [r for r in results if (r["guide"], r["loss"]) == (guide, loss)]
        first = mine[0]
        particles = f"{first['loss_particles']} x {first['components']}" if first["components"] > 1 \
            else str(first["loss_particles"])
        rows.append([guide, loss, particles, _mean_sd([r["gap"] for r in mine], 4),
                     _mean_sd([r["is_error"] for r in mine], 4), _mean_sd([r["khat"] for r in mine], 2),
                     _mean_sd([100 * r["ess"] / r["eval_particles"] for r in mine], 1),
                     _mean_sd([r["modes"] for r in mine], 1),
                     f"{statistics.mean(r['train_seconds'] for r in mine):.0f}"])
        if guide != OURS:
            continue
        for key, goal in GOALS.items():
            values = [r[key] for r in mine]
            mean, worst = statistics.mean(values), max(values)
            lines.append(f"{guide} + {loss}: {key} <= {goal} {'met' if mean <= goal else 'NOT met'} "
                         f"(mean {mean:.4f}, worst seed {worst:.4f}; {sum(v <= goal for v in values)} of "
                         f"{len(values)} seeds within)")
    return header, rows, lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=[f"{g}/{l}" for g, l in CONFIGS], metavar="GUIDE/LOSS",
                        help=f"(guide, loss) pairs; guides {sorted(GUIDES)}, losses {sorted(LOSSES)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--particles", type=int, default=8, help="T, per component (one-component guides get 3 T)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta0", type=float, default=1.0, help="the first temperature of the likelihood")
    parser.add_argument("--anneal-steps", type=int, default=0, help="steps of the linear ramp of beta to 1")
    parser.add_argument("--transforms", type=int, default=2)
    parser.add_argument("--hidden", nargs="+", type=int, default=[32, 32])
    parser.add_argument("--eval-particles", type=int, default=10000)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--rst", metavar="PATH")
    parser.add_argument("--table-from", metavar="JSON", help="print the tables of an earlier --json run; run nothing")
    args = parser.parse_args(argv)
    if args.table_from:
        summary = json.loads(Path(args.table_from).read_text())
        header, rows, lines = summarise(summary["runs"])
        print(markdown(header, rows, text_columns=2))
        print("\n".join(lines))
        if args.rst:
            write_atomically(Path(args.rst), lambda p: p.write_text(rst(header, rows, _caption(summary["settings"]))))
        return summary
    if args.steps < 1 or args.particles < 1 or args.eval_particles < 2 or not args.lr > 0:
        parser.error("--steps and --particles must be >= 1, --eval-particles >= 2 and --lr > 0")
    configs = [tuple(c.split("/", 1)) for c in args.configs]
    for config in configs:
        if len(config) != 2 or config[0] not in GUIDES or config[1] not in LOSSES:
            parser.error(f"--configs: expected GUIDE/LOSS with GUIDE in {sorted(GUIDES)} and LOSS in "
                         f"{sorted(LOSSES)}, got {'/'.join(config)!r}")

    print(f"{TARGET.description}, log Z = {TARGET.log_z:.4f}; {args.steps} steps, T = {args.particles}"
          f" per component, beta0 = {args.beta0:g} over {args.anneal_steps} steps", flush=True)
    results = []
    for name, loss in configs:
        for seed in args.seeds:
            result = run(name, loss, seed, args.steps, args.particles, args.lr, args.eval_particles, args.transforms,
                         tuple(args.hidden), args.beta0, args.anneal_steps)
            results.append(result)
            print(f"{name:>22} {loss:>14} seed {seed}: gap {result['gap']:.4f}  IS error {result['is_error']:.4f}  "
                  f"k-hat {result['khat']:.2f}  modes {result['modes']}  ({result['train_seconds']:.0f} s)", flush=True)
    header, rows, lines = summarise(results)
    print()
    print(markdown(header, rows, text_columns=2))
    for line in lines:
        print(line)
    summary = {"target": TARGET.description, "log_z": TARGET.log_z, "settings": vars(args),
               "guides": {n: GUIDES[n][2] for n, _ in configs}, "goals": lines, "runs": results}
    if args.json:
        write_atomically(Path(args.json), lambda p: p.write_text(json.dumps(summary, indent=2)))
    if args.rst:
        write_atomically(Path(args.rst), lambda p: p.write_text(rst(header, rows, _caption(vars(args)))))
    return summary


def _caption(settings: dict[str, Any]) -> str:
    return (f"{TARGET.description}: log Z - ELBO (gap) and IS error, mean ± sd over {len(settings['seeds'])} "
            f"seeds, {settings['steps']} steps")


if __name__ == "__main__":
    main()
