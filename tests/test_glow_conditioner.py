r"""The convolutional conditioner of the image couplings: Glow's own three-convolution
network (``blocks=0``) and the ResNet, their parameter counts, and Glow built on them."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pyro_flowpack as pf
from pyro_flowpack.nn import ConvResNet


def stated_count(c_in: int, c_out: int, h: int, blocks: int) -> int:
    """The count in ConvResNet's docstring."""
    hidden = h * h + h if blocks == 0 else blocks * (10 * h * h + 2 * h)
    return (9 * c_in + 1) * h + hidden + (9 * h + 1) * c_out


@pytest.mark.parametrize("blocks", [0, 1, 2])
@pytest.mark.parametrize("c_in, c_out, h", [(2, 4, 64), (4, 8, 64), (3, 50, 16)])
def test_conv_resnet_has_the_stated_parameter_count(c_in, c_out, h, blocks):
    net = ConvResNet(c_in, c_out, hidden_channels=h, blocks=blocks)
    assert sum(p.numel() for p in net.parameters()) == stated_count(c_in, c_out, h, blocks)


def test_conv_resnet_without_blocks_is_glows_3x3_1x1_3x3_network_starting_at_zero():
    net = ConvResNet(2, 4, hidden_channels=16, blocks=0)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (1, 1), (3, 3)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(2, 16), (16, 16), (16, 4)]
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 2
    out = net(torch.randn(3, 5, 2, 8, 8))
    assert out.shape == (3, 5, 4, 8, 8) and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("blocks", [-1, True, 1.0])
def test_conv_resnet_rejects_blocks_that_are_not_non_negative_ints(blocks):
    with pytest.raises(ValueError, match="blocks"):
        ConvResNet(2, 4, blocks=blocks)


@pytest.mark.parametrize("coupling, P", [("affine", 2), ("spline", 3 * 8 - 1)])
@pytest.mark.parametrize("blocks", [0, 1])
def test_glow_couplings_and_priors_all_use_the_blocks_option(blocks, coupling, P):
    # levels 2, steps 4 on (1, 8, 8): 4 couplings on (4, 4, 4) (2 channels read, 2
    # transformed), 4 on (8, 2, 2) (4 and 4), and one affine prior on (4, 4, 4)
    flow = pf.flows.Glow((1, 8, 8), levels=2, steps=4, hidden_channels=32, num_bins=17, blocks=blocks,
                         coupling=coupling)
    networks = [m for m in flow.modules() if isinstance(m, ConvResNet)]
    expected = sorted([stated_count(2, 2 * P, 32, blocks)] * 4 + [stated_count(4, 4 * P, 32, blocks)] * 4
                      + [stated_count(2, 2 * 2, 32, blocks)])
    assert sorted(sum(p.numel() for p in n.parameters()) for n in networks) == expected


def test_glow_without_blocks_has_about_a_fifth_of_the_default_parameters_and_learns():
    count = lambda flow: sum(p.numel() for p in flow.parameters())
    small = pf.flows.Glow((1, 8, 8), levels=2, steps=4, hidden_channels=64, num_bins=17, blocks=0)
    default = pf.flows.Glow((1, 8, 8), levels=2, steps=4, hidden_channels=64, num_bins=17)
    assert count(small) == 83508 and count(default) == 415860
    torch.manual_seed(0)
    x = pf.data.digits("train").images[:64]
    optimizer = torch.optim.Adam(small.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = -small().log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 10  # nats per image, from about 190
