"""Synthetic worlds with exact ground truth, for training and evaluating on a CPU without downloads.

- :mod:`vpo.worlds.shapes`: colored shapes on a small canvas; captions, yes/no questions, hallucinated preference
  pairs, boxes (LPOI), negative images rendered from a caption (OViP) and dataset writers.
"""
from vpo.worlds import shapes

__all__ = ["shapes"]
