"""Losses against independent computations, and which network each term reaches."""

import pytest
import torch
from torch import nn

from alphagan import losses
from alphagan.models import build_networks


class Linear(nn.Module):
    """A critic f(x) = sum(w * x) + b: its gradient is w everywhere, so the penalty is (|w| - 1)^2."""

    def __init__(self, shape, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(shape, generator=g) * 0.1)
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1, keepdim=True) + self.b


def test_gradient_penalty_of_a_linear_critic():
    critic = Linear((1, 4, 4, 4))
    real, fake = torch.randn(5, 1, 4, 4, 4), torch.randn(5, 1, 4, 4, 4)
    gp = losses.gradient_penalty(critic, real, fake)
    expected = (critic.w.detach().norm() - 1.0) ** 2
    torch.testing.assert_close(gp, expected)


def test_gradient_penalty_is_per_sample_not_per_voxel():
    # f(x) = 0.5 |x|^2 has gradient x_hat; with alpha fixed the penalty is the mean of (|x_hat_i| - 1)^2.
    def critic(x):
        return 0.5 * x.pow(2).flatten(1).sum(1, keepdim=True)

    real, fake = torch.randn(3, 1, 2, 3, 4), torch.randn(3, 1, 2, 3, 4)
    alpha = torch.tensor([0.0, 0.3, 1.0])
    gp = losses.gradient_penalty(critic, real, fake, alpha)
    x_hat = alpha.view(3, 1, 1, 1, 1) * real + (1 - alpha.view(3, 1, 1, 1, 1)) * fake
    per_sample = torch.stack([(x_hat[i].norm() - 1) ** 2 for i in range(3)]).mean()
    torch.testing.assert_close(gp, per_sample)
    # The authors' baseline took the norm over the channel axis only (one norm per voxel): a different number.
    per_voxel = ((x_hat.norm(2, dim=1) - 1) ** 2).mean()
    assert not torch.allclose(gp, per_voxel)


def test_gradient_penalty_trains_the_critic():
    critic = Linear((1, 2, 2, 2))
    gp = losses.gradient_penalty(critic, torch.randn(2, 1, 2, 2, 2), torch.randn(2, 1, 2, 2, 2))
    gp.backward()
    # d/dw (|w| - 1)^2 = 2 (|w| - 1) w / |w|
    w = critic.w.detach()
    torch.testing.assert_close(critic.w.grad, 2 * (w.norm() - 1) * w / w.norm())


def _nets(model="alpha-wgan-gp"):
    torch.manual_seed(0)
    return build_networks(model, 16, 2, 6, 16)


def test_alpha_wgan_gp_losses_equal_the_paper_equations():
    nets = _nets()
    E, G, D, C = (nets[k].eval() for k in "EGDC")  # eval: each forward independent of batch composition
    x, z_r = torch.rand(3, 1, 16, 16, 16) * 2 - 1, torch.randn(3, 6)
    torch.manual_seed(1)
    loss_d, terms = losses.alpha_wgan_gp_d(E, G, D, x, z_r, lambda_gp=10.0)
    with torch.no_grad():
        x_rec, x_rand = G(E(x)), G(z_r)
    torch.manual_seed(1)
    gp = losses.gradient_penalty(D, x, x_rec) + losses.gradient_penalty(D, x, x_rand)
    expected = D(x_rec).mean() + D(x_rand).mean() - 2 * D(x).mean() + 10.0 * gp
    torch.testing.assert_close(loss_d, expected)
    torch.testing.assert_close(terms["w_dist"], (D(x).mean() - D(x_rand).mean()).detach())

    loss_eg, terms = losses.alpha_wgan_gp_eg(E, G, D, C, x, z_r, lambda_rec=10.0)
    z_e = E(x)
    expected = -D(G(z_e)).mean() - D(G(z_r)).mean() + 10.0 * (x - G(z_e)).abs().mean() - C(z_e).mean()
    torch.testing.assert_close(loss_eg, expected)

    torch.manual_seed(2)
    loss_c, _ = losses.alpha_wgan_gp_c(E, C, x, z_r, lambda_gp=10.0)
    torch.manual_seed(2)
    expected = C(z_e).mean() - C(z_r).mean() + 10.0 * losses.gradient_penalty(C, z_r, z_e)
    torch.testing.assert_close(loss_c, expected)


def _grads(nets, loss):
    for net in nets.values():
        net.zero_grad(set_to_none=True)
    loss.backward()
    return {k: any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters()) for k, net in nets.items()}


def _frozen_except(nets, *names):
    for k, net in nets.items():
        net.requires_grad_(k in names)


def test_each_loss_reaches_only_its_networks():
    nets = _nets()
    x, z_r = torch.rand(2, 1, 16, 16, 16) * 2 - 1, torch.randn(2, 6)
    _frozen_except(nets, "D")
    assert _grads(nets, losses.alpha_wgan_gp_d(nets["E"], nets["G"], nets["D"], x, z_r, 10.0)[0]) == {
        "E": False,
        "G": False,
        "D": True,
        "C": False,
    }
    _frozen_except(nets, "C")
    assert _grads(nets, losses.alpha_wgan_gp_c(nets["E"], nets["C"], x, z_r, 10.0)[0]) == {
        "E": False,
        "G": False,
        "D": False,
        "C": True,
    }
    _frozen_except(nets, "E", "G")
    assert _grads(nets, losses.alpha_wgan_gp_eg(nets["E"], nets["G"], nets["D"], nets["C"], x, z_r, 10.0)[0]) == {
        "E": True,
        "G": True,
        "D": False,
        "C": False,
    }
    # Without freezing, the critic losses still never reach E or G (their inputs are made without gradient).
    _frozen_except(nets, "E", "G", "D", "C")
    assert not any(
        _grads(nets, losses.alpha_wgan_gp_d(nets["E"], nets["G"], nets["D"], x, z_r, 10.0)[0])[k] for k in "EG"
    )
    assert not _grads(nets, losses.alpha_wgan_gp_c(nets["E"], nets["C"], x, z_r, 10.0)[0])["E"]


def test_code_discriminator_learns_from_encoded_codes():
    """The authors' C update never got a gradient from C(z_e); ours does."""
    nets = _nets()
    E, C = nets["E"], nets["C"]
    x, z_r = torch.rand(4, 1, 16, 16, 16), torch.randn(4, 6)
    torch.manual_seed(0)
    loss, _ = losses.alpha_wgan_gp_c(E, C, x, z_r, 10.0)
    C.zero_grad()
    loss.backward()
    with_codes = [p.grad.clone() for p in C.parameters()]
    torch.manual_seed(0)
    with torch.no_grad():
        z_e = E(x)
    # The same loss without its encoded-code term: the gradients must differ.
    loss_without = -C(z_r).mean() + 10.0 * losses.gradient_penalty(C, z_r, z_e)
    C.zero_grad()
    loss_without.backward()
    assert any(not torch.allclose(a, p.grad) for a, p in zip(with_codes, C.parameters()))


def test_bce_on_logits_is_stable():
    nets = _nets("alpha-gan")
    x, z_r = torch.rand(2, 1, 16, 16, 16), torch.randn(2, 6)
    huge = nn.Module()
    huge.forward = lambda v: torch.full((v.shape[0], 1), 1e4)
    loss, _ = losses.alpha_gan_d(nets["E"], nets["G"], huge, x, z_r)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2e4, rel=1e-4)  # two fakes scored 1e4


def test_kl_divergence_matches_torch_distributions():
    mean, logvar = torch.randn(4, 6), torch.randn(4, 6)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(4, 6), torch.ones(4, 6))
    torch.testing.assert_close(losses.kl_divergence(mean, logvar), torch.distributions.kl_divergence(q, p).mean())


def test_vae_gan_terms_reach_the_encoder():
    nets = _nets("vae-gan")
    x, z_r, noise = torch.rand(2, 1, 16, 16, 16), torch.randn(2, 6), torch.randn(2, 6)
    _frozen_except(nets, "E", "G")
    loss, terms = losses.vae_gan_eg(nets["E"], nets["G"], nets["D"], x, z_r, noise, 10.0, 1.0)
    assert set(terms) == {"loss_eg", "kl", "l1", "adv"}
    assert _grads(nets, loss) == {"G": True, "D": False, "E": True}
    assert nets["E"].logvar.weight.grad.abs().sum() > 0  # through the reparameterisation


def test_wgan_gp_critic_loss():
    nets = _nets("wgan-gp")
    G, D = nets["G"].eval(), nets["D"].eval()
    x, z = torch.rand(2, 1, 16, 16, 16), torch.randn(2, 6)
    torch.manual_seed(3)
    loss, _ = losses.wgan_gp_d(G, D, x, z, 10.0)
    torch.manual_seed(3)
    with torch.no_grad():
        fake = G(z)
    torch.testing.assert_close(loss, D(fake).mean() - D(x).mean() + 10.0 * losses.gradient_penalty(D, x, fake))
