r"""A variational autoencoder on the 8x8 digits, written in Pyro, with a Gaussian posterior
and with an amortized flow posterior (and, optionally, a flow prior).

The model has a latent code :math:`z \in \mathbb{R}^8` per image and a Binomial
likelihood for each pixel's grey level :math:`x_i \in \{0, \dots, 16\}` (the digits have
17 levels; a Binomial with 16 trials is a proper distribution on exactly those values),

.. math:: z \sim p(z), \qquad x_i \mid z \sim \mathrm{Binomial}(16, \sigma(d_\theta(z)_i)) ,

with a decoder network :math:`d_\theta` and a standard normal prior, or a MAF prior
(``flow_prior``). The guide is an amortized posterior :math:`q_\phi(z \mid x)`:

- ``gaussian``: an encoder gives the mean and scale of a diagonal normal;
- ``flow``: the same encoder gives a mean and scale and a context :math:`h(x)`, and a
  conditional IAF on :math:`h(x)` reshapes the Gaussian noise before the mean and
  scale are applied (:class:`pyro_flowpack.infer.AmortizedFlow` with ``affine=True``
  around :class:`pyro_flowpack.flows.IAF`): the guide starts as the Gaussian one, and
  sampling and scoring a sample are one pass.

Each variant is trained by ``SVI`` with ``Trace_ELBO`` for the same number of epochs,
from the same seed, and evaluated on the test split with ``--iw-samples`` draws of
:math:`z` per image: the ELBO (the mean of the log-weights
:math:`\log p(x, z_s) - \log q(z_s \mid x)`) and the importance-weighted log-likelihood
(:math:`\log \frac{1}{k} \sum_s \exp` of the same log-weights, a tighter lower bound of
:math:`\log p(x)`), both in nats per image, higher is better. The log-weights come from
Pyro's own traces (``poutine.trace`` of the guide, ``poutine.replay`` of the model) under
a plate of particles.

Run ``python examples/vae_flow.py`` (a few minutes on two CPU cores). The results are
printed and written to ``--out/metrics.json``.

References:
    | Auto-Encoding Variational Bayes (Kingma et al., 2014)
    | https://arxiv.org/abs/1312.6114

    | Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)
    | https://arxiv.org/abs/1606.04934

    | Importance Weighted Autoencoders (Burda et al., 2016)
    | https://arxiv.org/abs/1509.00519
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

# Small networks: OpenMP threads that spin while waiting only steal the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor

import pyro_flowpack as pf
from pyro_flowpack.infer import AmortizedFlow
from pyro_flowpack.train import write_atomically

LATENT = 8
PIXELS = 64
TRIALS = 16  # 17 grey levels: 0..16
HIDDEN = 256
CONTEXT = 32
VARIANTS = ("gaussian", "flow", "flow_prior")


def mlp(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, HIDDEN), nn.ELU(), nn.Linear(HIDDEN, HIDDEN), nn.ELU(),
                         nn.Linear(HIDDEN, outputs))


class GaussianPosterior(nn.Module):
    r"""The usual amortized posterior: :math:`q(z \mid x) = \mathcal{N}(\mu(x), \mathrm{diag}\,\sigma(x)^2)`."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = mlp(PIXELS, 2 * LATENT)

    def forward(self, x: Tensor) -> dist.Distribution:
        loc, raw = self.encoder(x).chunk(2, dim=-1)
        return dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1)


class VAE(nn.Module):
    """The decoder, the amortized posterior and (for ``flow_prior``) the prior's flow."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        self.decoder = mlp(LATENT, PIXELS)
        if variant == "gaussian":
            self.posterior = GaussianPosterior()
        else:
            # the encoder gives a location, a scale and the IAF's context: the guide starts
            # as the Gaussian one (the IAF is the identity at first) and learns to depart
            self.posterior = AmortizedFlow(mlp(PIXELS, 2 * LATENT + CONTEXT),
                                           pf.flows.IAF(LATENT, context=CONTEXT, transforms=4, hidden=(128, 128)),
                                           affine=True)
        self.prior_flow = pf.flows.MAF(LATENT, transforms=4, hidden=(128, 128)) if variant == "flow_prior" else None
        self.register_buffer("zeros", torch.zeros(LATENT))

    def prior(self) -> dist.Distribution:
        if self.prior_flow is not None:
            return self.prior_flow()  # MAF form: log_prob of the guide's samples is one pass
        return dist.Normal(self.zeros, 1.0).to_event(1)

    def model(self, x: Tensor) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", dist.Binomial(TRIALS, logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("vae", self)
        with pyro.plate("data", len(x)):
            pyro.sample("z", self.posterior(x / TRIALS))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=100, help="passes over the training split per variant")
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="initial Adam learning rate (decays tenfold)")
    parser.add_argument("--iw-samples", type=int, default=200, help="draws of z per test image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("vae_flow_output"), help="output folder")
    args = parser.parse_args(argv)
    if min(args.epochs, args.batch, args.iw_samples) < 1:
        parser.error("--epochs, --batch and --iw-samples must be positive")
    return args


def flat(images: Tensor) -> Tensor:
    """``(N, 1, 8, 8)`` integer images as ``(N, 64)`` float grey levels."""
    return images.reshape(len(images), -1).float()


@torch.no_grad()
def log_weights(vae: VAE, x: Tensor, k: int) -> Tensor:
    r"""The log-weights :math:`\log p(x, z_s) - \log q(z_s \mid x)` of ``k`` draws per
    image, of shape ``(k, N)``, from Pyro traces under a plate of particles."""
    with pyro.plate("particles", k, dim=-2):
        guide = poutine.trace(vae.guide).get_trace(x)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    guide.compute_log_prob()
    model.compute_log_prob()
    joint = sum(site["log_prob"] for site in model.nodes.values() if site["type"] == "sample")
    return joint - guide.nodes["z"]["log_prob"]


def evaluate(vae: VAE, x: Tensor, k: int, chunk: int = 50) -> tuple[float, float]:
    """The test ELBO and importance-weighted log-likelihood, in nats per image."""
    vae.eval()
    log_w = torch.cat([log_weights(vae, x[i : i + chunk], k) for i in range(0, len(x), chunk)], dim=1)
    elbo = log_w.mean(0)
    iw = torch.logsumexp(log_w, 0) - math.log(k)
    return elbo.mean().item(), iw.mean().item()


def train(variant: str, train_x: Tensor, args: argparse.Namespace) -> tuple[VAE, float]:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(variant)
    generator = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * math.ceil(len(train_x) / args.batch)
    # Adam with gradient clipping and a learning rate decaying tenfold over the run
    optimizer = pyro.optim.ClippedAdam({"lr": args.lr, "clip_norm": 10.0, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(vae.model, vae.guide, optimizer, Trace_ELBO())
    every = max(args.epochs // 5, 1)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        vae.train()
        total = 0.0
        for index in torch.randperm(len(train_x), generator=generator).split(args.batch):
            total += svi.step(train_x[index])
        if epoch % every == 0 or epoch == args.epochs:
            print(f"{variant:>10}  epoch {epoch:4d}  train ELBO {-total / len(train_x):9.3f} nats/image", flush=True)
    return vae, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    train_x = flat(pf.data.digits("train").images)
    test_x = flat(pf.data.digits("test").images)
    print(f"digits: {len(train_x)} train / {len(test_x)} test images, {torch.get_num_threads()} threads", flush=True)

    results = {}
    for variant in args.variants:
        vae, seconds = train(variant, train_x, args)
        pyro.set_rng_seed(args.seed)
        elbo, iw = evaluate(vae, test_x, args.iw_samples)
        results[variant] = {
            "test_elbo": elbo,
            "test_iw_log_likelihood": iw,
            "parameters": sum(p.numel() for p in vae.parameters()),
            "train_time_s": round(seconds, 2),
        }
        print(f"{variant:>10}  test ELBO {elbo:9.3f}  IW log-likelihood (k={args.iw_samples}) {iw:9.3f} "
              f"nats/image  ({seconds:.1f} s)", flush=True)

    print(f"\n{'variant':>10}  {'test ELBO':>10}  {'IW log p(x)':>12}  (nats per image, higher is better)")
    for variant, r in results.items():
        print(f"{variant:>10}  {r['test_elbo']:10.3f}  {r['test_iw_log_likelihood']:12.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "likelihood": f"Binomial({TRIALS}) per pixel",
        "latent": LATENT,
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "iw_samples": args.iw_samples,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "test_images": len(test_x),
        "results": results,
    }
    path = args.out / "metrics.json"
    write_atomically(path, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
