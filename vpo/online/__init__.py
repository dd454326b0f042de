"""OViP's online loop: sample from the current policy, judge, pair, synthesize negative images, buffer.

- :func:`sample_responses`: ``k`` seeded samples per (image, prompt) with ``generate`` (:mod:`vpo.online.sampling`);
- judges ``G_r(A, A*) ∈ [0, 10]`` (:mod:`vpo.online.judges`): :class:`ShapesWorldJudge` (exact),
  :class:`OpenAIChatJudge` (an OpenAI-compatible chat endpoint, e.g. a local vLLM server);
- negative images (:mod:`vpo.online.negatives`): :class:`ShapesNegativeGenerator`, :class:`DiffusersNegativeGenerator`;
- the loop (:mod:`vpo.online.ovip`): :func:`select_pairs` (the paper's filter), :class:`ExperienceBuffer`,
  :func:`ovip_online_step`;
- its data (:mod:`vpo.online.ovip_data`): :func:`load_prompt_rows`, :func:`ovip_build_dataset` (a dataset folder for
  ``method: ovip``) and :class:`OViPOnlineDataset` (the trainer's online data source).

The image-side loss and the image-free pass are the trainer's (``method: ovip``, :func:`vpo.losses.ovip_image_loss`);
the records made here carry what they need (``neg_image``).
"""
from vpo.online.judges import (
    PAPER_JUDGE_PROMPT,
    Judge,
    JudgeError,
    JudgeRequest,
    OpenAIChatJudge,
    ShapesWorldJudge,
    make_judge,
    parse_score,
)
from vpo.online.negatives import (
    DiffusersNegativeGenerator,
    NegativeImageGenerator,
    NegativeRequest,
    ShapesNegativeGenerator,
    make_negative_generator,
)
from vpo.online.ovip import (
    ExperienceBuffer,
    OnlineConfig,
    SelectedPair,
    ovip_online_step,
    pair_margin,
    score_std,
    select_pairs,
)
from vpo.online.ovip_data import OViPOnlineDataset, load_prompt_rows, ovip_build_dataset
from vpo.online.sampling import KeyedSampler, expand_inputs, sample_responses, stream_seed

__all__ = [
    "PAPER_JUDGE_PROMPT",
    "DiffusersNegativeGenerator",
    "ExperienceBuffer",
    "Judge",
    "JudgeError",
    "JudgeRequest",
    "KeyedSampler",
    "NegativeImageGenerator",
    "NegativeRequest",
    "OViPOnlineDataset",
    "OnlineConfig",
    "OpenAIChatJudge",
    "SelectedPair",
    "ShapesNegativeGenerator",
    "ShapesWorldJudge",
    "expand_inputs",
    "load_prompt_rows",
    "make_judge",
    "make_negative_generator",
    "ovip_build_dataset",
    "ovip_online_step",
    "pair_margin",
    "parse_score",
    "sample_responses",
    "score_std",
    "select_pairs",
    "stream_seed",
]
