"""vpo: fused kernels and loss heads for visual preference optimization.

Public API (shapes in each docstring):

- fused losses on last hidden states + LM head: :func:`fused_dpo_loss`, :func:`fused_tpo_loss`, :func:`fused_catpo_loss`
- ops: :func:`linear_logprobs`, :func:`target_logits`, :func:`linear_token_kl`, :func:`segment_sum`, :func:`sequence_sum`
- loss heads on per-sequence log-probs: :mod:`vpo.losses`; the materializing oracle: :mod:`vpo.oracle`
- data-side helpers: :func:`add_diffusion_noise` (TPO), :func:`catpo_token_weights` (Cat-PO)
- :data:`AVAILABLE`: what is built and usable here (``cpp``, ``cuda_ext``, ``cuda_device``, ``triton``)
"""
from typing import TYPE_CHECKING

from vpo import _lazy

__version__ = "0.1.0"

# The public names load on first use (PEP 562, vpo._lazy), so `vpo --help` and the command line's other light paths
# do not pay for importing torch and the kernels (benchmarks/cli_startup.py measures it).
_SUBMODULES = ("losses", "oracle")
_ATTRS = {
    "AVAILABLE": "vpo._ext",
    "catpo_token_weights": "vpo.catpo",
    "CatPOOutput": "vpo.fused", "PreferenceOutput": "vpo.fused", "TPOOutput": "vpo.fused",
    "fused_catpo_loss": "vpo.fused", "fused_dpo_loss": "vpo.fused", "fused_tpo_loss": "vpo.fused",
    "add_diffusion_noise": "vpo.noise",
    "linear_logprobs": "vpo.ops.linear_logprobs", "target_logits": "vpo.ops.linear_logprobs",
    "segment_sum": "vpo.ops.segment_sum", "sequence_sum": "vpo.ops.segment_sum",
    "linear_token_kl": "vpo.ops.token_kl",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from vpo import losses, oracle  # noqa: F401
    from vpo._ext import AVAILABLE  # noqa: F401
    from vpo.catpo import catpo_token_weights  # noqa: F401
    from vpo.fused import (CatPOOutput, PreferenceOutput, TPOOutput, fused_catpo_loss,  # noqa: F401
                           fused_dpo_loss, fused_tpo_loss)
    from vpo.noise import add_diffusion_noise  # noqa: F401
    from vpo.ops.linear_logprobs import linear_logprobs, target_logits  # noqa: F401
    from vpo.ops.segment_sum import segment_sum, sequence_sum  # noqa: F401
    from vpo.ops.token_kl import linear_token_kl  # noqa: F401


__getattr__, __dir__ = _lazy.lazy_exports(__name__, _ATTRS, submodules=_SUBMODULES)

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
