"""OViP's data around the online step (:mod:`vpo.online.ovip`): the example rows it reads, the dataset folder it writes
and the trainer's online data source.

- :func:`load_prompt_rows`: the examples ``{"id", "image", "prompt", <ground truth>, ...}`` from a JSONL file or a
  list of rows;
- :func:`ovip_build_dataset`: one pass of :func:`~vpo.online.ovip.ovip_online_step` over them, written as a dataset
  folder for ``method: ovip``;
- :class:`OViPOnlineDataset`: an endless stream of records sampled from the current policy (the trainer's data).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch.utils.data

from vpo.online.judges import Judge
from vpo.online.negatives import NegativeImageGenerator
from vpo.online.ovip import ExperienceBuffer, OnlineConfig, SampleFn, ovip_online_step
from vpo.online.sampling import stream_seed

# --------------------------------------------------------------------------------------------------- source rows
_GT_KEYS = ("answer", "response", "chosen")
# Ids of OViPOnlineDataset.placeholder_records: a rank without pairs trains on these with zero loss.
NO_PAIR_PREFIX = "__vpo_no_pair__/"


def load_prompt_rows(source: Any, *, image_root: Optional[str] = None) -> List[Dict[str, Any]]:
    """The examples of the online loop: rows ``{"id", "image", "prompt", <ground truth>, ...}``.

    ``source``: a JSONL path (relative images resolved against ``image_root``, default the file's folder) or a list
    of dicts. The ground truth ``A*`` is the row's ``"answer"``, else ``"response"``, else ``"chosen"`` (so the shapes
    world's SFT, eval-caption and preference files all work; caption rows without any get ``None``: no fallback).
    Every row is kept whole as the example's ``context`` (the shapes judge and renderer read ``"objects"`` /
    ``"scene"`` from it).
    """
    from vpo.data.records import resolve_image

    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"source must be a JSONL file or a list of rows, got the missing path {path!r}")
        base = os.fspath(image_root) if image_root is not None else os.path.dirname(os.path.abspath(path))
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not JSON: {e}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n} must be a JSON object, got {type(row).__name__}")
                row.setdefault("id", f"{os.path.basename(path)}:{n}")
                rows.append(row)
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        base = os.fspath(image_root) if image_root is not None else None
        rows = [dict(r) for r in source]
        for i, r in enumerate(rows):
            r.setdefault("id", f"row{i}")
    else:
        raise ValueError(f"source must be a JSONL path or a list of dicts, got {type(source).__name__}")
    out = []
    for r in rows:
        if not isinstance(r.get("prompt"), str) or r.get("image") is None:
            raise ValueError(f"row {r.get('id')!r} needs 'prompt' (a string) and 'image'")
        r["image"] = resolve_image(r["image"], base)
        r["_ground_truth"] = next((r[k] for k in _GT_KEYS if isinstance(r.get(k), str) and r[k].strip()), None)
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------------- dataset builder
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "x"


def ovip_build_dataset(
    out_dir: str,
    policy,
    processor,
    source: Any,
    *,
    judge: Judge,
    negatives: NegativeImageGenerator,
    seed: int = 0,
    prompts_per_step: int = 8,
    limit: Optional[int] = None,
    split: str = "train",
    image_root: Optional[str] = None,
    sample_fn: Optional[SampleFn] = None,
    config: Optional[OnlineConfig] = None,
    **overrides,
) -> Dict[str, Any]:
    """Run the online pipeline once over ``source`` with ``policy`` and write an OViP training set to ``out_dir``.

    Writes ``out_dir/{split}.jsonl`` (the ``"vpo"`` layout of ``docs/data_format.md``: ``id``, ``image``,
    ``prompt``, ``chosen``, ``rejected``, ``neg_image`` with paths relative to ``out_dir``, plus ``ovip`` =
    the provenance of :func:`ovip_online_step`), the images under ``out_dir/images/{split}/`` (``I⁺`` once per
    source example, ``I⁻`` per pair, PNG) and ``out_dir/{split}_ovip_stats.json`` (the summed step stats).
    Read it back with ``vpo.data.read_preference_jsonl(out_dir/{split}.jsonl)`` and train with ``method: ovip``.

    Args:
        out_dir: the dataset folder (created).
        policy / processor: the model to sample from and its processor.
        source: the examples (:func:`load_prompt_rows`): a JSONL path or a list of rows.
        judge / negatives: as :func:`ovip_online_step`.
        seed: the run's seed. Every step uses the same step seed and example ``i`` (the row's position) samples
            from the stream keyed ``i``, so the output does not depend on ``prompts_per_step`` (up to float
            rounding in the model: another padding length can flip a draw at a CDF boundary).
        prompts_per_step: examples per online step.
        limit: only the first ``limit`` examples.
        split: the file names' split.
        image_root: resolves relative image paths of a JSONL source (default: its folder).
        sample_fn / config / overrides: as :func:`ovip_online_step` (``k=..., temperature=...``).

    Returns:
        ``{"path": the JSONL path, "records": count, "examples": count, **summed stats}``.
    """
    from vpo.data.records import load_image

    if isinstance(prompts_per_step, bool) or not isinstance(prompts_per_step, int) or prompts_per_step < 1:
        raise ValueError(f"prompts_per_step must be an int >= 1, got {prompts_per_step!r}")
    cfg = OnlineConfig.make(config, **overrides)
    rows = load_prompt_rows(source, image_root=image_root)[:limit]
    img_dir = os.path.join(out_dir, "images", split)
    os.makedirs(img_dir, exist_ok=True)
    totals: Dict[str, float] = {}
    lines: List[Dict[str, Any]] = []
    saved: Dict[str, str] = {}
    run_seed = stream_seed("vpo.online.build", seed)
    for lo in range(0, len(rows), prompts_per_step):
        chunk = rows[lo:lo + prompts_per_step]
        images = [load_image(r["image"]) for r in chunk]
        records, stats = ovip_online_step(
            policy, processor, [r["prompt"] for r in chunk], images, [r["_ground_truth"] for r in chunk],
            judge=judge, negatives=negatives, seed=run_seed,
            contexts=chunk, ids=[str(r["id"]) for r in chunk], keys=list(range(lo, lo + len(chunk))),
            sample_fn=sample_fn, config=cfg,
        )
        for key, v in stats.items():
            if key not in ("mean_score", "buffer_size"):
                totals[key] = totals.get(key, 0.0) + v
        by_id = {str(r["id"]): (r, im) for r, im in zip(chunk, images)}
        for rec in records:
            src = rec.extra["ovip"]["source_id"]
            row, image = by_id[src]
            if src not in saved:
                rel = f"images/{split}/{_safe(src)}.png"
                image.save(os.path.join(out_dir, rel), format="PNG")
                saved[src] = rel
            neg_rel = f"images/{split}/{_safe(rec.id)}_neg.png"
            rec.neg_image.save(os.path.join(out_dir, neg_rel), format="PNG")
            line = {"id": rec.id, "image": saved[src], "prompt": rec.prompt, "chosen": rec.chosen,
                    "rejected": rec.rejected, "neg_image": neg_rel, "ovip": rec.extra["ovip"]}
            for key in ("objects", "scene"):  # keep the shapes world's ground truth for evaluation and LPOI
                if key in row:
                    line[key] = row[key]
            lines.append(line)
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    if totals.get("scored"):
        totals["mean_score"] = totals["score_sum"] / totals["scored"]
    summary = {"path": path, "records": len(lines), "examples": len(rows), **totals}
    with open(os.path.join(out_dir, f"{split}_ovip_stats.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


# ----------------------------------------------------------------------------------------- the trainer's data source
class OViPOnlineDataset(torch.utils.data.IterableDataset):
    """An endless ``torch.utils.data.IterableDataset`` of OViP records sampled from the CURRENT policy.

    Each ``next()`` that finds the buffer empty runs :func:`ovip_online_step` on the next ``prompts_per_step``
    examples (reshuffled every pass with ``seed + pass``) until the :class:`ExperienceBuffer` hands out
    ``buffer_size`` records, which are then yielded one by one. With ``per_device_train_batch_size ==
    buffer_size``, ``num_workers=0`` (sampling must run in the training process, on the live weights) and
    ``max_steps`` set, every training batch is one buffer take, sampled right before its step.

    Args:
        examples: the source (:func:`load_prompt_rows`: a JSONL path or a list of rows).
        processor / judge / negatives / config / overrides: as :func:`ovip_online_step`.
        buffer_size: ``N``.
        policy: the model to sample from; the trainer sets it to ``trainer.model`` (the peft-wrapped policy when
            LoRA is on) before training: ``dataset.policy = trainer.model``.
        prompts_per_step: examples per online step.
        seed: the run's seed.
        max_passes: stop after this many passes over the examples (None: endless).
        sample_fn: as :func:`ovip_online_step`.

    Metrics: :meth:`pop_metrics` returns and resets the sums since the last call, under ``online/``:
    ``sampling_s``, ``scoring_s``, ``negatives_s``, ``pairs``, ``fallback_pairs``, ``prompts``, ``responses``, ...,
    plus ``online/mean_score`` and ``online/buffer_size``. A pass over all examples that yields no pair raises
    ``RuntimeError`` (instead of looping forever), unless ``idle_when_empty`` (several processes): then it yields
    :meth:`placeholder_records`, trained on with zero loss.
    """

    def __init__(self, examples: Any, processor, *, judge: Judge, negatives: NegativeImageGenerator,
                 buffer_size: int, policy=None, prompts_per_step: int = 8, seed: int = 0,
                 max_passes: Optional[int] = None, image_root: Optional[str] = None,
                 sample_fn: Optional[SampleFn] = None, config: Optional[OnlineConfig] = None, **overrides):
        if isinstance(prompts_per_step, bool) or not isinstance(prompts_per_step, int) or prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be an int >= 1, got {prompts_per_step!r}")
        self.rows = load_prompt_rows(examples, image_root=image_root)
        if not self.rows:
            raise ValueError("examples is empty: the online loop needs at least one (image, prompt) example")
        self.processor = processor
        self.judge = judge
        self.negatives = negatives
        self.buffer = ExperienceBuffer(buffer_size)
        self.policy = policy
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.max_passes = max_passes
        self.sample_fn = sample_fn
        self.config = OnlineConfig.make(config, **overrides)
        self.steps = 0
        # The stream's position (state_dict): pass, next chunk of the pass, pairs produced in the pass. Kept on the
        # dataset, not in the generator, so a new iterator (a resumed run, the next epoch) continues the stream.
        self.passes = 0
        self.next_chunk = 0
        self.produced = 0
        self._metrics: Dict[str, float] = {}
        # Under several processes (the trainer sets it): a pass without pairs yields one buffer of placeholders
        # (placeholder_records) instead of raising.
        self.idle_when_empty = False

    def state_dict(self) -> Dict[str, Any]:
        """The stream's position and the buffer's records (``vpo.trainer.online.save_online_state`` writes it with the
        checkpoint), so a resumed run samples exactly what the uninterrupted one would have."""
        return {"steps": self.steps, "passes": self.passes, "next_chunk": self.next_chunk, "produced": self.produced,
                "buffer": list(self.buffer._items), "dropped": self.buffer.dropped}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s position, with its buffered records."""
        for key in ("steps", "passes", "next_chunk", "produced"):
            setattr(self, key, int(state[key]))
        self.buffer.clear()
        self.buffer.add(state["buffer"])
        self.buffer.dropped = int(state.get("dropped", 0))

    def placeholder_records(self) -> List[Any]:
        """``buffer_size`` stand-in records (ids ``NO_PAIR_PREFIX + <row id>``, the row's image as both images) for a
        rank whose pass found no pair: the trainer runs them and scales their loss by zero, so this rank joins the
        step's collectives with a zero gradient (:mod:`vpo.trainer.distributed`)."""
        from vpo.data.records import PreferenceRecord, load_image

        out = []
        for n in range(self.buffer.batch_size):
            row = self.rows[n % len(self.rows)]
            image = load_image(row["image"])
            gt = row.get("_ground_truth") or "."
            out.append(PreferenceRecord(id=f"{NO_PAIR_PREFIX}{row['id']}/{self.passes}-{n}", image=image,
                                        prompt=row["prompt"], chosen=gt, rejected=gt + " no", neg_image=image,
                                        extra={"ovip": {"source_id": str(row["id"]), "placeholder": True}}))
        self._metrics["placeholder_pairs"] = self._metrics.get("placeholder_pairs", 0.0) + len(out)
        return out

    def pop_metrics(self) -> Dict[str, float]:
        """The online stats summed since the last call (``online/<name>``), and the buffer's size now."""
        out = {f"online/{k}": v for k, v in self._metrics.items()}
        if self._metrics.get("scored"):
            out["online/mean_score"] = self._metrics["score_sum"] / self._metrics["scored"]
        out["online/buffer_size"] = float(len(self.buffer))
        self._metrics = {}
        return out

    def __iter__(self) -> Iterator[Any]:
        import random

        from vpo.data.records import load_image

        if self.policy is None and self.sample_fn is None:
            raise RuntimeError("OViPOnlineDataset.policy is not set: set dataset.policy = trainer.model before "
                               "training (or pass sample_fn)")
        while self.buffer.ready:  # a restored buffer: hand out what the interrupted run would have handed out next
            yield from self.buffer.take()
        while self.max_passes is None or self.passes < self.max_passes:
            order = list(range(len(self.rows)))
            random.Random(stream_seed("vpo.online.order", self.seed, self.passes)).shuffle(order)
            while self.next_chunk * self.prompts_per_step < len(order):
                lo = self.next_chunk * self.prompts_per_step
                chunk_idx = order[lo:lo + self.prompts_per_step]
                chunk = [self.rows[i] for i in chunk_idx]
                records, stats = ovip_online_step(
                    self.policy, self.processor, [r["prompt"] for r in chunk],
                    [load_image(r["image"]) for r in chunk], [r["_ground_truth"] for r in chunk],
                    judge=self.judge, negatives=self.negatives, seed=stream_seed("vpo.online.step", self.seed,
                                                                                  self.steps),
                    buffer=self.buffer, contexts=chunk, ids=[str(r["id"]) for r in chunk], keys=chunk_idx,
                    sample_fn=self.sample_fn, config=self.config,
                )
                self.steps += 1
                self.next_chunk += 1
                self.produced += int(stats["pairs"])
                for key, v in stats.items():
                    if key not in ("mean_score", "buffer_size"):
                        self._metrics[key] = self._metrics.get(key, 0.0) + v
                yield from records
                while self.buffer.ready:
                    yield from self.buffer.take()
            if self.produced == 0 and self.idle_when_empty:
                # Several processes: this rank must still step with the others (vpo.trainer.distributed).
                yield from self.placeholder_records()
            elif self.produced == 0:
                raise RuntimeError(f"a whole pass over the {len(self.rows)} examples produced no OViP pair: check the "
                                   f"judge's scores and the filter (delta={self.config.delta}, "
                                   f"tau_pos={self.config.tau_pos}, tau_neg={self.config.tau_neg})")
            self.passes += 1
            self.next_chunk = 0
            self.produced = 0
