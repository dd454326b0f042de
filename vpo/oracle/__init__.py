"""The oracle: plain, readable PyTorch for every item of docs/methods.md.

Everything here materializes whatever it needs (full ``[N, V]`` logits, full attention maps) and works in float64, so
the fast paths (``vpo.ops``, ``vpo_kernels``, ``csrc``) can be tested against it. Nothing here is meant to be fast.
"""
from vpo.oracle.logprobs import sequence_logps, token_logprobs, target_logits

__all__ = ["token_logprobs", "target_logits", "sequence_logps"]
from vpo.oracle.tpo import (  # noqa: E402
    tpo_calibrated_reward,
    tpo_log_calibrated_reward,
    tpo_loss,
    tpo_scores,
    tpo_sequence_logps,
)
from vpo.oracle.catpo import catpo_loss, image_attention_stats, token_kl, weighted_sequence_logps  # noqa: E402

__all__ += ["tpo_scores", "tpo_calibrated_reward", "tpo_log_calibrated_reward", "tpo_sequence_logps", "tpo_loss"]
__all__ += ["image_attention_stats", "token_kl", "weighted_sequence_logps", "catpo_loss"]
from vpo.oracle.dpo import dpo_loss  # noqa: E402
from vpo.oracle.ovip import ovip_loss  # noqa: E402
from vpo.oracle.lpoi import lpoi_loss  # noqa: E402
from vpo.oracle.mdpo import mdpo_loss  # noqa: E402

__all__ += ["dpo_loss", "ovip_loss", "lpoi_loss", "mdpo_loss"]
