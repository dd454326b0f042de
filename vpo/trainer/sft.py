"""Supervised fine-tuning on (image, prompt, response) records: the demo's first stage (teach a tiny VLM to caption).

- :class:`SFTCollator` tokenizes a record exactly as :class:`vpo.data.PreferenceCollator` tokenizes a chosen response
  (it runs that collator on the record with ``chosen = rejected = response`` and keeps the chosen row), so the SFT
  model sees the same chat template, image tokens, end-of-turn label and right padding as the preference stage. Each
  record's row is memoized by ``(image, prompt, response)``: epochs after the first cost no tokenization.
- :class:`SFTTrainer` is a ``transformers.Trainer`` whose loss is the mean token negative log-likelihood of the
  labels, computed like the preference losses from the backbone's last hidden states and the LM head with
  :func:`vpo.linear_logprobs` (no ``[tokens × vocab]`` logits).
- :func:`make_sft_trainer` / :func:`sft_train` wire both (AdamW, linear decay after a warmup; progress bar and
  ``log_history`` from the Trainer).

Records are dicts with ``image`` (a path, or anything :func:`vpo.data.load_image` reads), ``prompt``, ``response``
and optionally ``id``; :func:`read_sft_jsonl` reads the files :func:`vpo.worlds.shapes.make_sft_dataset` writes.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from transformers import Trainer, TrainingArguments

from vpo.data.batching import IGNORE_INDEX
from vpo.data.collator import PreferenceCollator
from vpo.ops.linear_logprobs import linear_logprobs
from vpo.trainer.modeling import head_kwargs, head_transform, lm_head, model_type_of
from vpo.trainer.passes import forward_hidden, select_rows

_ROW_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")


def read_sft_jsonl(path: str, image_root: Optional[str] = None) -> List[Dict[str, Any]]:
    """The records of an SFT JSONL file (``{"id", "image", "prompt", "response", ...}`` per line), relative image
    paths resolved against ``image_root`` (default: the file's folder)."""
    from vpo.worlds.shapes import read_jsonl

    root = image_root or os.path.dirname(os.path.abspath(path))
    out = []
    for i, row in enumerate(read_jsonl(path)):
        for key in ("image", "prompt", "response"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"{path}: line {i + 1} has no {key!r} string")
        image = row["image"]
        if not os.path.isabs(image) and not image.startswith("data:"):
            image = os.path.join(root, image)
        out.append({**row, "id": str(row.get("id", f"{os.path.basename(path)}:{i + 1}")), "image": image})
    return out


class SFTCollator:
    """Records -> ``{"input_ids", "attention_mask", "labels", <the family's vision keys>}`` (``[B, L]``, right
    padded, labels unshifted with ``-100`` off the response), through :class:`vpo.data.PreferenceCollator` (module
    docstring).

    Args:
        processor: the model's processor (with a chat template).
        family: ``"llava"``, ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"idefics2"``.
        max_length: responses are cut so a row fits (the preference collator's rule).
        cache: memoize each record's row (keyed by image, prompt and response; only images given as strings).
    """

    def __init__(self, processor, family: str = "llava", *, max_length: Optional[int] = None, cache: bool = True):
        self.collator = PreferenceCollator(processor, family, method="dpo", max_length=max_length)
        self.family = family
        self.pad_token_id = self.collator.pad_token_id
        self.cache = {} if cache else None
        vision = getattr(getattr(processor, "image_processor", None), "merge_size", None)
        self._merge = int(vision or 2)
        self._image_token_id = self.collator.image_token_id

    def _key(self, rec: Mapping) -> Optional[tuple]:
        image = rec.get("image")
        if self.cache is None or not isinstance(image, str):
            return None
        return image, rec.get("prompt"), rec.get("response")

    def encode(self, rec: Mapping) -> Optional[Dict[str, torch.Tensor]]:
        """One record's row as a dict of ``[1, ...]`` tensors (vision keys included), or None if the preference
        collator skips the record (it warns with the reason)."""
        key = self._key(rec)
        if key is not None and key in self.cache:
            return self.cache[key]
        response = rec.get("response")
        pref = {"id": str(rec.get("id", "sft")), "image": rec.get("image"), "prompt": rec.get("prompt"),
                "chosen": response, "rejected": response}
        batch = self.collator([pref])
        if not batch["ids"]:
            row = None
        else:
            keep = torch.tensor([0])  # the chosen row (rows 0..B-1 are the chosen responses)
            full = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            row = select_rows(full, keep, merge_size=self._merge, image_token_id=self._image_token_id)
        if key is not None:
            self.cache[key] = row
        return row

    def __call__(self, records: Sequence[Mapping]) -> Dict[str, torch.Tensor]:
        rows = [r for r in (self.encode(rec) for rec in records) if r is not None]
        if not rows:
            raise ValueError("every record of the batch was skipped (see the DataWarning messages)")
        length = max(r["input_ids"].shape[1] for r in rows)
        out: Dict[str, torch.Tensor] = {}
        pad_value = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX,
                     "mm_token_type_ids": 0}
        for k in rows[0]:
            if k in _ROW_KEYS:
                t = torch.full((len(rows), length), pad_value[k], dtype=rows[0][k].dtype)
                for i, r in enumerate(rows):
                    t[i, : r[k].shape[1]] = r[k][0]
                out[k] = t
            else:  # vision tensors: one image per row, concatenated along the first dim
                out[k] = torch.cat([r[k] for r in rows])
        return out


def sft_loss(model, inputs: Mapping[str, torch.Tensor], impl: str = "auto") -> torch.Tensor:
    """Mean negative log-likelihood of the label tokens, from the last hidden states and the LM head."""
    labels = inputs["labels"]
    model_in = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = forward_hidden(model, model_in)[:, :-1]
    weight, bias = lm_head(model)
    shifted = labels[:, 1:]
    kw = head_kwargs(linear_logprobs, head_transform(model), model_type_of(model))  # soft-cap / logit scale
    logp, _ = linear_logprobs(hidden.to(weight.dtype), weight, shifted, bias, impl=impl, **kw)
    n = (shifted != IGNORE_INDEX).sum().clamp_min(1)
    return -logp.sum() / n


class SFTTrainer(Trainer):
    """``transformers.Trainer`` with :func:`sft_loss` (module docstring)."""

    def __init__(self, *args, loss_impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_impl = loss_impl
        self.model_accepts_loss_kwargs = False  # the loss is a mean over this batch's label tokens

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss = sft_loss(model, inputs, self.loss_impl)
        return (loss, {}) if return_outputs else loss


def make_sft_trainer(
    model,
    processor,
    records: Sequence[Mapping],
    *,
    output_dir: str,
    max_steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    warmup_steps: int = 30,
    weight_decay: float = 0.0,
    seed: int = 0,
    logging_steps: int = 10,
    family: str = "llava",
    use_cpu: bool = True,
    disable_tqdm: Optional[bool] = None,
    collator: Optional[SFTCollator] = None,
    callbacks: Optional[list] = None,
    loss_impl: str = "auto",
    **training_args,
) -> SFTTrainer:
    """An :class:`SFTTrainer` fine-tuning every parameter of ``model`` on ``records`` for ``max_steps`` steps (AdamW,
    linear decay after ``warmup_steps``, no checkpoints, no reporting; ``loss_impl``: the kernel choice of
    :func:`vpo.linear_logprobs`); ``training_args`` go to
    ``transformers.TrainingArguments``. Call ``.train()`` on it (or use :func:`sft_train`)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not records:
        raise ValueError("records is empty: nothing to fine-tune on")
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        lr_scheduler_type="linear",
        logging_steps=logging_steps,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=use_cpu,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=disable_tqdm,
        **training_args,
    )
    model.requires_grad_(True)
    return SFTTrainer(model=model, args=args, train_dataset=list(records),
                      data_collator=collator or SFTCollator(processor, family), callbacks=callbacks,
                      loss_impl=loss_impl)


def sft_train(model, processor, records: Sequence[Mapping], **kwargs) -> SFTTrainer:
    """Run :func:`make_sft_trainer` (same arguments) to the end; returns the trainer (its ``state.log_history``
    holds the loss curve; ``trainer.save_state()`` writes it to ``output_dir``). The model is trained in place and
    left in eval mode."""
    trainer = make_sft_trainer(model, processor, records, **kwargs)
    trainer.train()
    model.eval()
    return trainer
