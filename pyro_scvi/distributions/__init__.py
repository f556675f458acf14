"""Count distributions in scVI's (mean, inverse dispersion) parametrisation, and their fast paths.

- :mod:`.negative_binomial`: ``NegativeBinomial`` and ``ZeroInflatedNegativeBinomial`` (torch formula,
  sparse-aware variant, dispatch to the fused kernel);
- :mod:`.fused`: the fused C kernel for the NB/ZINB log-density and its gradient (``csrc/``);
- :mod:`.kernel_choice`: which of the two computes ``log_prob`` here, decided by measurement;
- :mod:`.pochhammer`: exact ``log Γ(x + θ) − log Γ(θ)`` and ``log x!`` helpers.
"""

from . import fused, kernel_choice
from .negative_binomial import (
    NegativeBinomial,
    ZeroInflatedNegativeBinomial,
    dense_log_prob,
    fused_kernel_off,
)

__all__ = [
    "NegativeBinomial", "ZeroInflatedNegativeBinomial", "dense_log_prob", "fused", "fused_kernel_off",
    "kernel_choice",
]
