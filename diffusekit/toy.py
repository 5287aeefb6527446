"""Data whose optimal denoiser is known in closed form: a Gaussian and a Gaussian mixture.

For x_t = a x0 + b eps with x0 ~ N(mu, Sigma), E[x0 | x_t] = mu + a Sigma (a^2 Sigma + b^2 I)^-1 (x_t - a mu);
a mixture weighs each component's posterior mean by its responsibility for x_t. Samplers fed these
denoisers must reproduce the data distribution: the project's exact oracle (SPEC §8).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .denoisers import Cond
from .parametrization import Prediction
from .schedules import Schedule


class GaussianMixture:
    """x0 ~ sum_k pi_k N(mu_k, Sigma_k) on samples of any shape [B, *shape] (flattened to d = prod(shape))."""

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor | None = None, shape: tuple[int, ...] | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # [K, d]
        self.covs = torch.as_tensor(covs, dtype=torch.float64)  # [K, d, d]
        K, d = self.means.shape
        if self.covs.shape != (K, d, d):
            raise ValueError(f"covs must have shape {(K, d, d)}, got {tuple(self.covs.shape)}")
        self.weights = torch.full((K,), 1 / K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.shape = shape or (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold {d} values")

    @classmethod
    def gaussian(cls, mean: Tensor, cov: Tensor, shape: tuple[int, ...] | None = None) -> "GaussianMixture":
        return cls(torch.as_tensor(mean)[None], torch.as_tensor(cov)[None], shape=shape)

    @property
    def mean(self) -> Tensor:
        return self.weights @ self.means

    @property
    def cov(self) -> Tensor:
        centred = self.means - self.mean
        return torch.einsum("k,kij->ij", self.weights, self.covs + centred[:, :, None] * centred[:, None, :])

    def sample(self, n: int, generator: torch.Generator | None = None, a: float = 1.0, b: float = 0.0) -> Tensor:
        """n draws of x_t = a x0 + b eps (x0 itself by default), shape [n, *shape], float64."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        x0 = self.means[k] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(self.covs)[k], z)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return (a * x0 + b * eps).reshape(n, *self.shape)

    def component(self, k: int) -> "GaussianMixture":
        """Component k alone: the data of class k, when each component is a class."""
        return GaussianMixture(self.means[k:k + 1], self.covs[k:k + 1], shape=self.shape)

    def _moments_t(self, xt: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """For rows of xt [n, d] sharing one (a, b): the log responsibilities log p(k | x_t) [n, K] and S^-1 r."""
        S = a**2 * self.covs + b**2 * torch.eye(xt.shape[1], dtype=torch.float64)  # [K, d, d] covariance of x_t
        r = xt[:, None] - a * self.means  # [n, K, d]
        sol = torch.einsum("kij,nkj->nki", torch.linalg.inv(S), r)  # S^-1 r
        log_resp = self.weights.log() - 0.5 * ((r * sol).sum(-1) + torch.logdet(S))
        return torch.log_softmax(log_resp, dim=1), sol

    def _posterior_mean(self, xt: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """E[x0 | x_t] for x_t = a x0 + b eps, rows of xt [n, d] sharing one (a, b)."""
        log_resp, sol = self._moments_t(xt, a, b)
        post = self.means + a * torch.einsum("kij,nkj->nki", self.covs, sol)  # [n, K, d]
        return torch.einsum("nk,nkd->nd", log_resp.exp(), post)

    def classifier(self, schedule: Schedule):
        """The exact noisy classifier log p(y | x_t) of each sample's own class y (cond['class_labels']), each
        component being a class: Bayes' rule over the components' marginals at t (differentiable in x)."""

        def log_p(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
            xt, y = x.reshape(len(x), -1).to(torch.float64), cond["class_labels"].cpu()
            out = []
            for i in range(len(x)):
                a, b = schedule.alpha_sigma(t[i:i + 1].cpu())
                out.append(self._moments_t(xt[i:i + 1].cpu(), a, b)[0][0, y[i]])
            return torch.stack(out).to(x)

        return log_p

    def denoiser(self, schedule: Schedule):
        """The optimal (posterior-mean) denoiser of this data under `schedule`."""

        def D(x: Tensor, t: Tensor, cond: Cond | None = None) -> Prediction:
            xt = x.reshape(len(x), -1).to(torch.float64).cpu()  # [B, d]
            x0 = torch.empty_like(xt)
            t_unique, index = t.cpu().unique(return_inverse=True)
            for j, (a, b) in enumerate(zip(*schedule.alpha_sigma(t_unique))):
                rows = index == j
                x0[rows] = self._posterior_mean(xt[rows], a, b)
            a, b = (c[index][:, None] for c in schedule.alpha_sigma(t_unique))
            eps = (xt - a * x0) / b
            return Prediction(*(v.reshape(x.shape).to(x) for v in (eps, x0)))

        return D


def ring_mixture(k: int = 8, radius: float = 2.0, std: float = 0.2) -> GaussianMixture:
    """The 2-D demo data: k Gaussians on a circle."""
    angle = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    means = radius * torch.stack([angle.cos(), angle.sin()], 1)
    return GaussianMixture(means, std**2 * torch.eye(2, dtype=torch.float64).expand(k, 2, 2))
