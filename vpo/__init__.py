"""vpo: fused kernels and loss heads for visual preference optimization.

Public API (shapes in each docstring):

- fused losses on last hidden states + LM head: :func:`fused_dpo_loss`, :func:`fused_tpo_loss`, :func:`fused_catpo_loss`
- ops: :func:`linear_logprobs`, :func:`target_logits`, :func:`linear_token_kl`, :func:`segment_sum`, :func:`sequence_sum`
- loss heads on per-sequence log-probs: :mod:`vpo.losses`; the materializing oracle: :mod:`vpo.oracle`
- data-side helpers: :func:`add_diffusion_noise` (TPO), :func:`catpo_token_weights` (Cat-PO)
- :data:`AVAILABLE`: what is built and usable here (``cpp``, ``cuda_ext``, ``cuda_device``, ``triton``)
"""
from vpo._ext import AVAILABLE
from vpo import losses, oracle
from vpo.catpo import catpo_token_weights
from vpo.fused import CatPOOutput, PreferenceOutput, TPOOutput, fused_catpo_loss, fused_dpo_loss, fused_tpo_loss
from vpo.noise import add_diffusion_noise
from vpo.ops.linear_logprobs import linear_logprobs, target_logits
from vpo.ops.segment_sum import segment_sum, sequence_sum
from vpo.ops.token_kl import linear_token_kl

__version__ = "0.1.0"

__all__ = [
    "AVAILABLE",
    "CatPOOutput",
    "PreferenceOutput",
    "TPOOutput",
    "add_diffusion_noise",
    "catpo_token_weights",
    "fused_catpo_loss",
    "fused_dpo_loss",
    "fused_tpo_loss",
    "linear_logprobs",
    "linear_token_kl",
    "losses",
    "oracle",
    "segment_sum",
    "sequence_sum",
    "target_logits",
    "__version__",
]
