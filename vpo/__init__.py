"""vpo: fused kernels and loss heads for visual preference optimization.

See README.md for the quickstart and ../SPEC.md-derived docs for the math of each method.
"""
from vpo._ext import AVAILABLE
from vpo import losses, oracle
from vpo.ops.segment_sum import segment_sum, sequence_sum

__version__ = "0.1.0"

__all__ = ["AVAILABLE", "losses", "oracle", "segment_sum", "sequence_sum", "__version__"]
