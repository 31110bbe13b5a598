"""Networks: the authors' parameter counts, every size, the stated initialisation, resize-convolution."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alphagan.models import (
    CodeDiscriminator,
    Discriminator,
    Encoder,
    Generator,
    HeadConv3d,
    ResizeConv3d,
    StemConvTranspose3d,
    VariationalEncoder,
    build_networks,
    count_parameters,
    reparameterise,
)


def test_parameter_counts_equal_the_authors_code():
    # docs/method.md: counted on the authors' code at 64^3, latent 1000, width 64.
    assert count_parameters(Generator(64, 64, 1000)) == 37_416_512
    assert count_parameters(Encoder(64, 64, 1000)) == 43_785_896
    assert count_parameters(Discriminator(64, 64)) == 11_049_665
    assert count_parameters(CodeDiscriminator(1000, 4096)) == 20_901_889


def _formula_discriminator(size, w):
    """D's parameters counted by hand: conv weights + biases, BatchNorm weights + biases."""
    total, c_in, c_out, s = 0, 1, w, size
    while s > 4:
        total += c_in * c_out * 64 + c_out + (2 * c_out if c_in > 1 else 0)
        c_in, c_out, s = c_out, 2 * c_out, s // 2
    return total + c_in * 64 + 1


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_every_size_and_width(size):
    width, latent = 2, 7
    G, D, E = Generator(size, width, latent), Discriminator(size, width), Encoder(size, width, latent)
    x = G(torch.randn(2, latent))
    assert x.shape == (2, 1, size, size, size)
    assert x.abs().max() <= 1.0  # tanh
    assert D(x).shape == (2, 1) and E(x).shape == (2, latent)
    assert count_parameters(D) == _formula_discriminator(size, width)


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        Generator(48, 4, 8)


def test_initialisation_is_dcgan():
    torch.manual_seed(0)
    D = Discriminator(64, 64)
    conv, bn = D.trunk[2], D.trunk[3]
    assert isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d)
    assert abs(conv.weight.std().item() - 0.02) < 0.0005 and abs(conv.weight.mean().item()) < 0.0005
    assert torch.all(conv.bias == 0)
    assert abs(bn.weight.mean().item() - 1.0) < 0.01 and abs(bn.weight.std().item() - 0.02) < 0.005
    assert torch.all(bn.bias == 0)


def test_generator_uses_resize_convolution():
    G = Generator(64, 4, 8)
    kinds = [type(m) for m in G.net]
    assert kinds.count(StemConvTranspose3d) == 1  # only the 1^3 -> 4^3 projection
    assert kinds.count(ResizeConv3d) == 4


def _same_as_reference(fast: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """`fast` and the plain PyTorch layers given its weights: the same output and the same gradients, for the
    weights and for the input, including the second-order gradient the gradient penalty takes."""
    fast, reference = fast.double(), reference.double()
    with torch.no_grad():
        for p, q in zip(fast.parameters(), reference.parameters(), strict=True):
            q.copy_(p)
    outputs, grads = [], []
    for layer in (fast, reference):
        xi = x.double().clone().requires_grad_()
        y = layer(xi)
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # every output counts differently
        (gx,) = torch.autograd.grad((y * weights).sum(), xi, create_graph=True)
        gx.square().sum().backward()
        outputs.append(y.detach())
        grads.append([gx.detach(), *(p.grad for p in layer.parameters())])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c_in,c_out,size", [(4, 1, 8), (6, 3, 4), (3, 5, 1)])
def test_resize_convolution_equals_upsampling_then_convolution(c_in, c_out, size):
    torch.manual_seed(0)
    fast = ResizeConv3d(c_in, c_out)
    nn.init.normal_(fast.weight)
    reference = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv3d(c_in, c_out, 3, 1, 1, bias=False))
    _same_as_reference(fast, reference, torch.randn(2, c_in, size, size, size))


def test_heads_and_stem_equal_the_plain_layers():
    torch.manual_seed(0)
    _same_as_reference(HeadConv3d(6, 5, 4), nn.Conv3d(6, 5, 4), torch.randn(3, 6, 4, 4, 4))
    stem, reference = StemConvTranspose3d(7, 3, 4), nn.ConvTranspose3d(7, 3, 4, bias=False)
    _same_as_reference(stem, reference, torch.randn(3, 7, 1, 1, 1))
    with pytest.raises(ValueError, match="needs a"):
        HeadConv3d(6, 5, 4)(torch.randn(1, 6, 8, 8, 8))


def test_reparameterisation():
    mean, logvar = torch.zeros(10000, 3), torch.log(torch.tensor([1.0, 4.0, 9.0])).expand(10000, 3)
    z = reparameterise(mean, logvar, torch.randn(10000, 3, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0, 3.0]), atol=0.06, rtol=0)
    mean, logvar = VariationalEncoder(16, 2, 5)(torch.randn(2, 1, 16, 16, 16))
    assert mean.shape == logvar.shape == (2, 5)


def test_networks_per_model():
    assert set(build_networks("alpha-wgan-gp", 16, 2, 4, 8)) == {"E", "G", "D", "C"}
    assert set(build_networks("alpha-gan", 16, 2, 4, 8)) == {"E", "G", "D", "C"}
    assert set(build_networks("wgan-gp", 16, 2, 4, 8)) == {"G", "D"}
    assert isinstance(build_networks("vae-gan", 16, 2, 4, 8)["E"], VariationalEncoder)


def test_transposed_convolution_prints_a_checkerboard_and_resize_convolution_does_not():
    from alphagan.viz import compare_upsampling

    for seed in range(3):
        transposed, resized = compare_upsampling(seed=seed)
        # Interior voxels only: the borders of both differ for padding reasons.
        t, r = transposed[2:-2, 2:-2, 2:-2], resized[2:-2, 2:-2, 2:-2]
        contrast_t = (t[0::2] - t[1::2]).abs().mean() / t.abs().mean()
        contrast_r = (r[0::2] - r[1::2]).abs().mean() / r.abs().mean()
        assert contrast_t > 5 * contrast_r


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_a_layer_normalised_or_plain_critic_scores_each_volume_on_its_own(norm):
    # The reason for critic_norm (docs/method.md, section 7): with BatchNorm a volume's score depends on the
    # rest of its batch, so a batch of near-identical samples is normalised like a varied one.
    torch.manual_seed(0)
    D = Discriminator(16, 2, norm).train()
    x = torch.randn(4, 1, 16, 16, 16)
    together, alone = D(x), torch.cat([D(x[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-6) == (norm != "batch")
    # BatchNorm and layer normalisation carry a weight and a bias per channel; none carries nothing.
    per_norm = 0 if norm == "none" else 2 * 4
    assert count_parameters(D) == _formula_discriminator(16, 2) - 2 * 4 + per_norm


def test_layer_normalisation_is_torchs_layer_norm_over_each_sample():
    torch.manual_seed(0)
    D = Discriminator(16, 2, "layer")
    norm = D.trunk[3]
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    h = torch.randn(3, 4, 4, 4, 4)
    expected = F.layer_norm(h, h.shape[1:], eps=norm.eps) * norm.weight.view(1, -1, 1, 1, 1)
    assert torch.allclose(norm(h), expected + norm.bias.view(1, -1, 1, 1, 1), atol=1e-5)
