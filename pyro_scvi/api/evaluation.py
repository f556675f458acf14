"""The evaluation part: ELBO, reconstruction error and the importance-sampled marginal likelihood.

All three are per-cell quantities of a trained model on any registered AnnData; the estimators
live in :mod:`pyro_scvi.infer.elbo` and :mod:`pyro_scvi.infer.importance`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..diagnostics import psis_diagnostics
from ..infer.elbo import elbo_parts
from ..infer.importance import log_importance_weights_in_passes
from ..infer.proposals import check_proposal

__all__ = ["EvaluationMixin"]


class EvaluationMixin:
    """Goodness of fit for a model following :class:`~pyro_scvi.api.protocol.ModelProtocol`."""

    def _elbo_terms_per_cell(
        self, adata, indices, batch_size, dataloader, method: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell reconstruction loss −log p(x | z, l) and summed KL (weight 1), one draw each."""
        self.check_not_minified(method, adata)
        self.module.eval()
        reconstruction, kl = [], []
        with self.pyro_scope(), torch.no_grad():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                parts = elbo_parts(self.module.model, self.module.guide, batch)
                reconstruction.append(sum(parts.reconstruction.values()))
                kl.append(
                    sum(parts.kl.values(), torch.zeros_like(reconstruction[-1])) + parts.kl_global_per_cell
                )
        return torch.cat(reconstruction), torch.cat(kl)

    def get_elbo(
        self, adata=None, indices=None, batch_size=None, dataloader=None, return_mean: bool = True
    ) -> torch.Tensor:
        """The evidence lower bound per cell, ``E_q[log p(x | z, l)] − KL(q(z, l | x) ‖ p(z, l))``.

        Returns the ELBO itself (a negative number, higher is better), as a 0-d tensor averaged over
        cells, or per cell ``(n,)`` with ``return_mean=False``; on the model's device. (The
        ``elbo_*`` entries of :attr:`history` are its negation.) One Monte-Carlo draw per cell.
        """
        self.check_trained()
        reconstruction, kl = self._elbo_terms_per_cell(adata, indices, batch_size, dataloader, "get_elbo")
        elbo = -(reconstruction + kl)
        return elbo.mean() if return_mean else elbo

    def get_reconstruction_error(
        self, adata=None, indices=None, batch_size=None, dataloader=None, return_mean: bool = True
    ) -> dict[str, torch.Tensor]:
        """``{"reconstruction_loss": −E_q log p(x | z, l)}``: a positive negative log-likelihood
        (lower is better), averaged over cells or per cell ``(n,)``; one draw per cell."""
        self.check_trained()
        reconstruction, _ = self._elbo_terms_per_cell(
            adata, indices, batch_size, dataloader, "get_reconstruction_error"
        )
        return {"reconstruction_loss": reconstruction.mean() if return_mean else reconstruction}

    def _log_importance_weights(
        self, batch, n_mc_samples: int, n_mc_samples_per_pass, proposal: str, **proposal_options
    ) -> torch.Tensor:
        """The ``(S, n)`` log importance weights behind :meth:`get_marginal_ll` for one minibatch; a
        model with latents the generic estimator does not suit (scANVI) replaces this."""
        return log_importance_weights_in_passes(
            self.module.model, self.module.guide, batch, n_mc_samples, n_mc_samples_per_pass,
            proposal=proposal, **proposal_options,
        )

    def get_marginal_ll(
        self,
        adata=None,
        indices=None,
        n_mc_samples: int = 1000,
        batch_size=None,
        return_mean: bool = True,
        dataloader=None,
        n_mc_samples_per_pass: int | None = None,
        return_diagnostics: bool = False,
        proposal: str = "guide",
        **proposal_options,
    ):
        """Importance-sampling estimate of the marginal log-likelihood ``log p(x_n)`` (negative,
        higher is better) with ``n_mc_samples`` draws per cell from a ``proposal``:

        * ``"guide"`` (default): the guide q(z, l | x) itself.
        * ``"defensive"``: per cell ``α·q + (1 − α)·q_wide``, ``q_wide`` a Student-t (or Normal)
          around the guide's mean with ``defensive_widening`` × its standard deviation as scale
          (options ``defensive_alpha=0.5``, ``defensive_widening=2.0``, ``defensive_df=4.0``;
          ``defensive_df=None`` for a Normal). The weights are bounded by those of ``q_wide`` over
          ``1 − α``, whose polynomial tails cover a posterior that the guide makes too narrow, and
          cost at most a factor ``1/α`` of effective draws where the guide is good (Hesterberg 1995).
        * ``"refined"``: per cell a Gaussian started at the guide's moments and moved by a few Adam
          steps on that cell's ELBO (``refine_steps=50``, ``refine_lr=0.05``, ``refine_particles=16``
          draws a step), its scale then × ``refine_widening=1.2`` (the ELBO optimum is too narrow
          for importance sampling); the networks are not changed. ``refine_covariance="full"``
          (default) refines a full covariance, ``"diagonal"`` element-wise scales;
          ``refine_df=ν`` makes the proposal a Student-t with ν degrees of freedom.

        Both work for any guide whose per-cell sites have a mean and standard deviation (closed
        form or Monte Carlo). Pick a proposal by the ``pareto_k`` of ``return_diagnostics``.
        Global latents (a dispersion hyper-prior) are fixed at their posterior mean.

        Returns the mean over cells as a float, or a CPU tensor ``(n,)`` with ``return_mean=False``.
        Densities of the logistic-normal latent are evaluated on the Gaussian (pre-softmax) variable.

        With ``return_diagnostics=True`` it returns instead a ``pandas.DataFrame`` with one row per
        cell (index: cell names; a range with ``dataloader``) and columns ``marginal_ll`` (the same
        estimate, from the same draws), ``pareto_k`` (PSIS k̂ of the importance weights; above 0.7
        the estimate of that cell is unreliable) and ``ess`` (effective sample size
        ``1 / Σ w̃²`` of the Pareto-smoothed normalised weights, out of ``n_mc_samples``);
        ``return_mean`` is then ignored. See :func:`pyro_scvi.diagnostics.psis_diagnostics`.
        """
        check_proposal(proposal)
        self.check_trained()
        self.check_not_minified("get_marginal_ll", adata)
        self.module.eval()
        values, pareto_k, ess = [], [], []
        with self.pyro_scope(), torch.no_grad():
            for batch in self.minibatches(adata, indices, batch_size, dataloader):
                log_weights = self._log_importance_weights(
                    batch, n_mc_samples, n_mc_samples_per_pass, proposal, **proposal_options
                ).cpu()  # (S, n)
                values.append(torch.logsumexp(log_weights, dim=0) - np.log(n_mc_samples))
                if not return_diagnostics:
                    continue
                psis = psis_diagnostics(log_weights)
                pareto_k.append(psis.pareto_k)
                ess.append(psis.ess)
        values = torch.cat(values)
        if return_diagnostics:
            index = (
                pd.RangeIndex(len(values), name="cell")
                if dataloader is not None
                else self.cell_names(adata, indices)
            )
            return pd.DataFrame(
                {
                    "marginal_ll": values.double().numpy(),
                    "pareto_k": np.concatenate(pareto_k),
                    "ess": np.concatenate(ess),
                },
                index=index,
            )
        return float(values.mean()) if return_mean else values
