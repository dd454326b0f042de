"""Preference-data construction: the datasets CSR, LPOI and mDPO train on, written in the format the trainer reads.

- :mod:`vpo.construct.csr`: sentence-level beam search under CSR's calibrated reward (``score`` and ``rank`` modes),
  image-text scorers (the shapes world's ground truth, CLIP from a local folder), :func:`write_csr_dataset` and the
  iterative loop :func:`csr_iterate`.
- :mod:`vpo.construct.lpoi`: LPOI's progressively masked image lists with a visual prompt and
  :func:`write_lpoi_dataset`; its detectors (the shapes world's ground truth, a zero-shot detector from a local folder)
  and the verification hook are in :mod:`vpo.construct.lpoi_detectors`.
- :mod:`vpo.construct.mdpo`: mDPO's crop (the collator's, recorded per example) and :func:`write_mdpo_dataset`.

Every writer reads a ``.jsonl`` file (or a folder with ``train.jsonl``) and writes ``out_dir/train.jsonl`` ("vpo"
layout, ``docs/data_format.md``; image paths relative to ``out_dir``), the images it made under ``out_dir/images/``
and ``out_dir/construct.json`` (options and counts). Command line: :mod:`vpo.construct.cli` (``vpo csr``,
``vpo lpoi-lists``, ``vpo mdpo-crops``).
"""
from typing import TYPE_CHECKING

from vpo import _lazy

# Names load on first use (PEP 562, vpo._lazy): the command line's parser imports vpo.construct.cli without torch.
_ATTRS = {
    "ConstructWarning": "vpo.construct._io", "ConstructionSummary": "vpo.construct._io",
    "CLIPScorer": "vpo.construct.csr", "CSRConfig": "vpo.construct.csr", "CSRIteration": "vpo.construct.csr",
    "CSRSearchResult": "vpo.construct.csr", "ImageTextScorer": "vpo.construct.csr", "Response": "vpo.construct.csr",
    "SentenceScore": "vpo.construct.csr", "ShapesWorldScorer": "vpo.construct.csr", "TokenLM": "vpo.construct.csr",
    "VLMTokenLM": "vpo.construct.csr", "calibrated_reward": "vpo.construct.csr", "csr_iterate": "vpo.construct.csr",
    "load_policy": "vpo.construct.csr", "make_scorer": "vpo.construct.csr", "propose_sentences": "vpo.construct.csr",
    "sentence_beam_search": "vpo.construct.csr", "sibling_ranks": "vpo.construct.csr",
    "vlm_factory": "vpo.construct.csr", "write_csr_dataset": "vpo.construct.csr",
    "Detection": "vpo.construct.lpoi_detectors", "Detector": "vpo.construct.lpoi_detectors",
    "DetectorVerifier": "vpo.construct.lpoi_detectors", "GroundTruthDetector": "vpo.construct.lpoi_detectors",
    "ZeroShotDetector": "vpo.construct.lpoi_detectors", "LPOIConfig": "vpo.construct.lpoi",
    "build_lpoi_list": "vpo.construct.lpoi",
    "lpoi_mask_side": "vpo.construct.lpoi", "lpoi_masks": "vpo.construct.lpoi",
    "write_lpoi_dataset": "vpo.construct.lpoi",
    "crop_image": "vpo.construct.mdpo", "mdpo_crop_box": "vpo.construct.mdpo",
    "write_mdpo_dataset": "vpo.construct.mdpo",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from vpo.construct._io import ConstructionSummary, ConstructWarning
    from vpo.construct.csr import (
        CSRConfig,
        CSRIteration,
        CSRSearchResult,
        CLIPScorer,
        ImageTextScorer,
        Response,
        SentenceScore,
        ShapesWorldScorer,
        TokenLM,
        VLMTokenLM,
        calibrated_reward,
        csr_iterate,
        load_policy,
        make_scorer,
        propose_sentences,
        sentence_beam_search,
        sibling_ranks,
        vlm_factory,
        write_csr_dataset,
    )
    from vpo.construct.lpoi import LPOIConfig, build_lpoi_list, lpoi_mask_side, lpoi_masks, write_lpoi_dataset
    from vpo.construct.lpoi_detectors import (
        Detection,
        Detector,
        DetectorVerifier,
        GroundTruthDetector,
        ZeroShotDetector,
    )
    from vpo.construct.mdpo import crop_image, mdpo_crop_box, write_mdpo_dataset


__getattr__, __dir__ = _lazy.lazy_exports(__name__, _ATTRS)

__all__ = [
    "CLIPScorer",
    "CSRConfig",
    "CSRIteration",
    "CSRSearchResult",
    "ConstructWarning",
    "ConstructionSummary",
    "Detection",
    "Detector",
    "DetectorVerifier",
    "GroundTruthDetector",
    "ImageTextScorer",
    "LPOIConfig",
    "Response",
    "SentenceScore",
    "ShapesWorldScorer",
    "TokenLM",
    "VLMTokenLM",
    "ZeroShotDetector",
    "build_lpoi_list",
    "calibrated_reward",
    "crop_image",
    "csr_iterate",
    "load_policy",
    "lpoi_mask_side",
    "lpoi_masks",
    "make_scorer",
    "mdpo_crop_box",
    "propose_sentences",
    "sentence_beam_search",
    "sibling_ranks",
    "vlm_factory",
    "write_csr_dataset",
    "write_lpoi_dataset",
    "write_mdpo_dataset",
]
