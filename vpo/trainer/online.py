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
gradients are all-reduced as for any batch. A process whose whole pass over its rows yields no pair does not raise
(``dataset.idle_when_empty``, set by the trainer): it trains one step on placeholder records with its loss scaled by
zero, so it still joins the step's collectives with a zero gradient (:mod:`vpo.trainer.distributed`), and samples
again on its next pass. Single process: such a pass raises.

Resuming: the online stream cannot be replayed (the policy that sampled it is gone), so ``ignore_data_skip`` is
forced on. Instead every checkpoint holds the stream itself (:func:`save_online_state`, called by
:class:`vpo.trainer.resume.ResumeMixin`): its position (sampling round, pass, next chunk of the shuffled rows) and
the experience buffer's leftover records (``ovip_state.json`` + their images as lossless PNG under
``ovip_buffer/``; ``_<rank>`` suffixes under several processes). Sampling is seeded by the round and the row, so a
resumed run samples, pairs and trains exactly as the uninterrupted one.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vpo.trainer.config import VPOConfig


def is_online_dataset(dataset) -> bool:
    """Whether ``dataset`` is OViP's online data source."""
    from vpo.online.ovip_data import OViPOnlineDataset

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


def _state_names(world_size: int, rank: int):
    suffix = "" if world_size <= 1 else f"_{rank}"
    return f"ovip_state{suffix}.json", f"ovip_buffer{suffix}"


def _encode(value: Any, folder: str, stem: str):
    """JSON for a record field; PIL images become lossless PNG files under ``folder``."""
    from PIL import Image

    if isinstance(value, Image.Image):
        name = f"{stem}.png"
        value.save(os.path.join(folder, name), format="PNG")
        return {"__png__": name, "mode": value.mode}
    if isinstance(value, (list, tuple)):
        return [_encode(v, folder, f"{stem}_{i}") for i, v in enumerate(value)]
    return value


def _decode(value: Any, folder: str):
    from PIL import Image

    if isinstance(value, dict) and "__png__" in value:
        with Image.open(os.path.join(folder, value["__png__"])) as im:
            image = im.convert(value["mode"]) if im.mode != value["mode"] else im.copy()
        return image
    if isinstance(value, list):
        return [_decode(v, folder) for v in value]
    return value


def save_online_state(dataset, checkpoint: str, *, world_size: int = 1, rank: int = 0) -> None:
    """Write ``dataset``'s (:class:`vpo.online.OViPOnlineDataset`) stream position and buffered records into the
    checkpoint folder ``checkpoint`` (module docstring)."""
    import dataclasses

    state_name, buffer_name = _state_names(world_size, rank)
    state = dataset.state_dict()
    folder = os.path.join(checkpoint, buffer_name)
    os.makedirs(folder, exist_ok=True)
    records = []
    for i, rec in enumerate(state.pop("buffer")):
        fields = {f.name: _encode(getattr(rec, f.name), folder, f"{i}_{f.name}") for f in dataclasses.fields(rec)}
        records.append(fields)
    state["buffer"] = records
    with open(os.path.join(checkpoint, state_name), "w", encoding="utf-8") as f:
        json.dump(state, f)


def load_online_state(dataset, checkpoint: str, *, world_size: int = 1, rank: int = 0) -> bool:
    """Restore what :func:`save_online_state` wrote; ``False`` (and the stream starts over) if the checkpoint has
    none (an older checkpoint)."""
    from vpo.data import PreferenceRecord

    state_name, buffer_name = _state_names(world_size, rank)
    path = os.path.join(checkpoint, state_name)
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    folder = os.path.join(checkpoint, buffer_name)
    state["buffer"] = [PreferenceRecord(**{k: _decode(v, folder) for k, v in rec.items()}) for rec in state["buffer"]]
    dataset.load_state_dict(state)
    return True
