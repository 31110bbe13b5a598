"""The losses of the alpha-WGAN-GP (the paper's eq. 1-3, docs/method.md) and of the baselines of Table 1.

Taught in notebook 03.

Each function takes the networks and a batch and returns (loss, terms): the scalar to minimise and a dict of
its detached parts for the log. Which networks a loss may update is decided by the caller (the training loop
freezes the others); the "fake" inputs of a critic loss are computed here without gradients, so a critic
loss never reaches the encoder or the generator, and the code discriminator is trained on detached codes.

Notation: x real volumes in [-1, 1]; z_r ~ N(0, I); z_e = E(x); x_rec = G(z_e); x_rand = G(z_r).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alphagan.models import reparameterise

Terms = dict[str, Tensor]


def gradient_penalty(
    critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, alpha: Tensor | None = None
) -> Tensor:
    """WGAN-GP: mean over samples of (||grad critic(x_hat)||_2 - 1)^2, x_hat = alpha real + (1 - alpha) fake.

    One alpha ~ U(0, 1) per sample; the norm is taken over all elements of each sample (every voxel), not per
    voxel as in the authors' WGAN-GP baseline. `fake` is detached. The result keeps its graph
    (create_graph=True), so minimising it trains the critic. `alpha` is drawn here when not given; the training
    loop passes its own draws so that every random number of a run comes from one checkpointed generator.

    Precision: x_hat and the norm are float32, but under autocast the backward pass runs through the critic's
    bf16/fp16 convolutions, so the gradient carries their rounding (per-sample norms within about 0.3 % of fp32).
    """
    real, fake = real.detach().float(), fake.detach().float()
    if alpha is None:
        alpha = torch.rand(real.shape[0], device=real.device)
    alpha = alpha.view(-1, *([1] * (real.dim() - 1))).to(real)
    x_hat = (alpha * real + (1.0 - alpha) * fake).requires_grad_(True)
    score = critic(x_hat)
    (grad,) = torch.autograd.grad(score.float().sum(), x_hat, create_graph=True)
    norm = grad.flatten(1).norm(2, dim=1)
    return ((norm - 1.0) ** 2).mean()


def _bce(logits: Tensor, target: float) -> Tensor:
    """Binary cross-entropy on logits (numerically stable: no sigmoid is ever taken separately)."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


# ------------------------------------------------------------------------------------------ alpha-WGAN-GP
def alpha_wgan_gp_eg(
    E: nn.Module, G: nn.Module, D: nn.Module, C: nn.Module, x: Tensor, z_r: Tensor, lambda_rec: float
) -> tuple[Tensor, Terms]:
    """L_EG = -E[D(x_rec)] - E[D(x_rand)] + lambda_2 |x - x_rec|_1 - E[C(z_e)]  (L_G + L_E, one optimiser)."""
    z_e = E(x)
    x_rec, x_rand = G(z_e), G(z_r)
    d_rec, d_rand = D(x_rec).float().mean(), D(x_rand).float().mean()
    c_enc = C(z_e).float().mean()
    l1 = (x - x_rec).float().abs().mean()
    loss = -d_rec - d_rand + lambda_rec * l1 - c_enc
    return loss, {"loss_eg": loss.detach(), "l1": l1.detach(), "d_rand": d_rand.detach(), "c_enc": c_enc.detach()}


def alpha_wgan_gp_d(
    E: nn.Module,
    G: nn.Module,
    D: nn.Module,
    x: Tensor,
    z_r: Tensor,
    lambda_gp: float,
    alphas: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Terms]:
    """L_D = E[D(x_rec)] + E[D(x_rand)] - 2 E[D(x)] + lambda_1 (GP_D(x, x_rec) + GP_D(x, x_rand)).

    `alphas`: the mixing weights of the two penalties (drawn here when not given)."""
    with torch.no_grad():
        x_rec, x_rand = G(E(x)), G(z_r)
    d_real, d_rec, d_rand = D(x).float().mean(), D(x_rec).float().mean(), D(x_rand).float().mean()
    a_rec, a_rand = alphas if alphas is not None else (None, None)
    gp = gradient_penalty(D, x, x_rec, a_rec) + gradient_penalty(D, x, x_rand, a_rand)
    loss = d_rec + d_rand - 2.0 * d_real + lambda_gp * gp
    # The critic's estimate of the Wasserstein distance between real and random samples.
    return loss, {
        "loss_d": loss.detach(),
        "gp_d": gp.detach(),
        "w_dist": (d_real - d_rand).detach(),
        "w_dist_rec": (d_real - d_rec).detach(),
    }


def alpha_wgan_gp_c(
    E: nn.Module, C: nn.Module, x: Tensor, z_r: Tensor, lambda_gp: float, alpha: Tensor | None = None
) -> tuple[Tensor, Terms]:
    """L_C = E[C(z_e)] - E[C(z_r)] + lambda_1 GP_C(z_r, z_e), on codes z_e = E(x) computed without gradient."""
    with torch.no_grad():
        z_e = E(x).float()
    c_enc, c_prior = C(z_e).float().mean(), C(z_r).float().mean()
    gp = gradient_penalty(C, z_r, z_e, alpha)
    loss = c_enc - c_prior + lambda_gp * gp
    return loss, {"loss_c": loss.detach(), "gp_c": gp.detach(), "w_dist_code": (c_prior - c_enc).detach()}


# ------------------------------------------------------------------------------------------ alpha-GAN (BCE)
def alpha_gan_eg(
    E: nn.Module, G: nn.Module, D: nn.Module, C: nn.Module, x: Tensor, z_r: Tensor, lambda_rec: float
) -> tuple[Tensor, Terms]:
    """The same alpha-GAN with the non-saturating GAN loss: fool D with x_rec and x_rand, fool C with z_e."""
    z_e = E(x)
    x_rec, x_rand = G(z_e), G(z_r)
    adv = _bce(D(x_rec), 1.0) + _bce(D(x_rand), 1.0)
    code = _bce(C(z_e), 1.0)
    l1 = (x - x_rec).float().abs().mean()
    loss = adv + lambda_rec * l1 + code
    return loss, {"loss_eg": loss.detach(), "l1": l1.detach(), "adv": adv.detach(), "code_adv": code.detach()}


def alpha_gan_d(E: nn.Module, G: nn.Module, D: nn.Module, x: Tensor, z_r: Tensor) -> tuple[Tensor, Terms]:
    with torch.no_grad():
        x_rec, x_rand = G(E(x)), G(z_r)
    loss = _bce(D(x), 1.0) + _bce(D(x_rec), 0.0) + _bce(D(x_rand), 0.0)
    return loss, {"loss_d": loss.detach()}


def alpha_gan_c(E: nn.Module, C: nn.Module, x: Tensor, z_r: Tensor) -> tuple[Tensor, Terms]:
    with torch.no_grad():
        z_e = E(x).float()
    loss = _bce(C(z_r), 1.0) + _bce(C(z_e), 0.0)
    return loss, {"loss_c": loss.detach()}


# ------------------------------------------------------------------------------------------ WGAN-GP
def wgan_gp_g(G: nn.Module, D: nn.Module, z_r: Tensor) -> tuple[Tensor, Terms]:
    loss = -D(G(z_r)).float().mean()
    return loss, {"loss_g": loss.detach()}


def wgan_gp_d(
    G: nn.Module, D: nn.Module, x: Tensor, z_r: Tensor, lambda_gp: float, alpha: Tensor | None = None
) -> tuple[Tensor, Terms]:
    """L_D = E[D(G(z))] - E[D(x)] + lambda GP_D(x, G(z)), with the per-sample penalty."""
    with torch.no_grad():
        x_rand = G(z_r)
    d_real, d_rand = D(x).float().mean(), D(x_rand).float().mean()
    gp = gradient_penalty(D, x, x_rand, alpha)
    loss = d_rand - d_real + lambda_gp * gp
    return loss, {"loss_d": loss.detach(), "gp_d": gp.detach(), "w_dist": (d_real - d_rand).detach()}


# ------------------------------------------------------------------------------------------ VAE-GAN
def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), averaged over latent dimensions and samples."""
    return (-0.5 * (1.0 + logvar - mean.pow(2) - logvar.exp())).float().mean()


def vae_gan_eg(
    E: nn.Module, G: nn.Module, D: nn.Module, x: Tensor, z_r: Tensor, noise: Tensor, lambda_rec: float, beta_kl: float
) -> tuple[Tensor, Terms]:
    """beta KL(q(z|x) || N(0, I)) + lambda_rec |x - G(z)|_1 + non-saturating GAN loss on x_rec and x_rand.

    z = mean + sigma * noise (the reparameterisation trick), so the KL and reconstruction terms reach E.
    """
    mean, logvar = E(x)
    x_rec, x_rand = G(reparameterise(mean, logvar, noise)), G(z_r)
    kl = kl_divergence(mean, logvar)
    l1 = (x - x_rec).float().abs().mean()
    adv = _bce(D(x_rec), 1.0) + _bce(D(x_rand), 1.0)
    loss = beta_kl * kl + lambda_rec * l1 + adv
    return loss, {"loss_eg": loss.detach(), "kl": kl.detach(), "l1": l1.detach(), "adv": adv.detach()}


def vae_gan_d(E: nn.Module, G: nn.Module, D: nn.Module, x: Tensor, z_r: Tensor) -> tuple[Tensor, Terms]:
    """Real against reconstructions (from the posterior mean) and random samples, as in VAE-GAN."""
    with torch.no_grad():
        mean, _ = E(x)
        x_rec, x_rand = G(mean), G(z_r)
    loss = _bce(D(x), 1.0) + _bce(D(x_rec), 0.0) + _bce(D(x_rand), 0.0)
    return loss, {"loss_d": loss.detach()}
