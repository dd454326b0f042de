"""OViP's online loop inside the trainer (``method: ovip``, ``online: true``).

:func:`build_online_dataset` turns a :class:`vpo.trainer.VPOConfig` into a :class:`vpo.online.OViPOnlineDataset`
over the source rows of ``data_path`` (a JSONL with ``image``, ``prompt`` and a ground truth ``answer`` /
``response`` / ``chosen``: the shapes world's ``train.jsonl``, its SFT or caption files, ...), with the judge
(``online_judge``) and negative-image generator (``online_negatives``) of the configuration.

:class:`vpo.trainer.VPOTrainer` recognises the dataset and:

- sets ``dataset.policy = trainer.model`` (the LoRA-wrapped policy; sampling switches it to eval mode and back);
- trains from a plain single-process ``DataLoader`` (``batch_size`` = the buffer size, ``num_workers=0``), NOT the
  one ``accelerate`` prepares: accelerate's loader fetches one batch ahead, which would sample step ``t + 1``'s pairs
  before step ``t`` updates the weights (and, for an ``IterableDataset`` under DDP, would sample on rank 0 only).
  So every batch is sampled from the weights of the optimizer step right before it;
- logs, per optimizer step (averaged over the logging window like every metric), the dataset's
  ``online/sampling_s``, ``online/scoring_s``, ``online/negatives_s`` (wall seconds spent sampling, judging and making
  negative images for this step's batches), its counts (``online/pairs``, ``online/fallback_pairs``,
  ``online/responses``, ``online/mean_score``, ``online/buffer_size`` ...) and ``online/training_s`` (wall seconds of
  the step's ``training_step`` calls: forward + backward of every micro-batch, CUDA-synchronised; the optimizer
  update is not included).

Distributed (DDP): each process samples from its own share of the source rows (``rows[rank::world_size]``, its own
seed) with its own replica of the policy (identical weights after every step) and trains on its own buffer; the
gradients are all-reduced as for any batch. Every process must find pairs: a process whose pass over its rows yields
none raises (and the others wait for it at the next all-reduce until the timeout), so give every rank enough rows.

Resuming: the online stream cannot be replayed (the policy that sampled it is gone), so ``ignore_data_skip`` is
forced on; the experience buffer's leftovers and the stream's step counter are not checkpointed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vpo.trainer.config import VPOConfig


def is_online_dataset(dataset) -> bool:
    """Whether ``dataset`` is OViP's online data source."""
    from vpo.online.ovip import OViPOnlineDataset

    return isinstance(dataset, OViPOnlineDataset)


def build_online_dataset(config: "VPOConfig", processor, *, rank: int = 0, world_size: int = 1):
    """The :class:`vpo.online.OViPOnlineDataset` of ``config`` (module docstring); ``policy`` is left unset (the
    trainer sets it). Under DDP, process ``rank`` of ``world_size`` gets the rows ``rank::world_size``."""
    from vpo.online import OViPOnlineDataset, load_prompt_rows, make_judge, make_negative_generator
    from vpo.online.sampling import stream_seed

    if processor is None:
        raise ValueError("online OViP samples with the model's processor (chat template, tokenizer), and none was "
                         "loaded")
    rows = load_prompt_rows(config.data_path, image_root=config.image_root)
    if not rows:
        raise ValueError(f"{config.data_path}: no source row for online OViP")
    seed = config.data_seed if config.data_seed is not None else config.seed
    if world_size > 1:
        rows = rows[rank::world_size]
        if not rows:
            raise ValueError(f"online OViP under {world_size} processes: process {rank} got no source row (the data "
                             f"has fewer rows than processes)")
        seed = stream_seed("vpo.online.rank", seed, rank)
    judge = make_judge(config.online_judge, url=config.online_judge_url, model=config.online_judge_model)
    negatives = make_negative_generator(config.online_negatives, path=config.online_negatives_path)
    buffer_size = config.online_buffer_size or config.per_device_train_batch_size
    return OViPOnlineDataset(rows, processor, judge=judge, negatives=negatives, buffer_size=buffer_size,
                             prompts_per_step=config.online_prompts_per_step, seed=seed, k=config.online_k,
                             temperature=config.online_temperature, max_new_tokens=config.online_max_new_tokens)
