"""``VPOTrainer``: a ``transformers.Trainer`` whose loss is a preference method on last hidden states + the LM head.

``compute_loss`` builds a :class:`vpo.trainer.passes.Passes` over the batch and calls the method's function
(:mod:`vpo.trainer.methods`); the fused losses read the backbone's post-norm last hidden states and
``lm_head.weight``, so no ``[tokens × vocab]`` logits are built. Everything else — optimizer, schedule, gradient
accumulation, mixed precision, gradient checkpointing, DDP, progress bars, ``report_to`` — is the Trainer's own.
Checkpoints, resuming and batches without a usable record go through :class:`vpo.trainer.resume.ResumeMixin`: atomic
checkpoints, resume from the newest complete one with every RNG and the data position restored, no phantom steps.

Metrics: each step's metrics (TRL's names plus the method's, :mod:`vpo.trainer.methods`) are stored, and averaged
over the steps since the last log (and over processes) when the Trainer logs, as TRL's ``DPOTrainer`` does with
``store_metrics``. Evaluation metrics get the ``eval_`` prefix. Records the collator skipped (``batch["skipped"]``, a
count or ``{reason: count}``) are summed over the logging window as ``data/skipped_<reason>``. An evaluation leaves
out the batches without a scored token (or without rows) from its loss and metric means, as training skips them, and
reports how many as ``eval_skipped_batches``; an evaluation with no usable batch raises ValueError.

OViP online (``method: ovip``, ``online: true``; :mod:`vpo.trainer.online`): with a
:class:`vpo.online.OViPOnlineDataset` as ``train_dataset`` the trainer points it at the policy, trains from a plain
loader (each batch sampled right before its step) and logs ``online/sampling_s``, ``online/scoring_s``,
``online/negatives_s`` and ``online/training_s`` per optimizer step, with the loop's counts.
"""
from __future__ import annotations

import copy
import time
from collections import defaultdict
from typing import Dict, Optional

import torch
from transformers import Trainer, TrainerCallback

from vpo.trainer import distributed, trl_compat, trl_options
from vpo.trainer.config import VPOConfig
from vpo.trainer.methods import compute
from vpo.trainer.metrics import count_tokens
from vpo.trainer.modeling import apply_lora, freeze_outside_language_model, unwrap_peft
from vpo.trainer.online import is_online_dataset
from vpo.trainer.passes import Passes
from vpo.trainer.reference import Reference, load_reference_table
from vpo.trainer.resume import ResumeMixin
from vpo.trainer.usable import batch_usable, mark_unscored, ranks_agree


_TOKENS = "\0num_tokens"  # the per-log token increment inside _flush's per-process totals


class VPOTrainer(ResumeMixin, Trainer):
    """Preference-optimization trainer for vision-language models (module docstring).

    Args:
        model: a transformers VLM (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Idefics2) or a peft model of one. With
            ``args.use_lora`` and a plain model, a LoRA adapter is added on the language model only
            (:func:`vpo.trainer.modeling.apply_lora`); without LoRA and with ``args.freeze_vision`` everything outside
            the language model and its head is frozen.
        args: a :class:`VPOConfig`.
        ref_model: the frozen reference model for ``ref_mode="model"`` (ignored otherwise).
        ref_table: precomputed reference terms for ``ref_mode="precomputed"``
            (:func:`vpo.trainer.precompute_reference`); default: read from ``args.ref_logps_path`` if set.
        data_collator: produces the preference batch contract (``docs/data_format.md``); default: built from
            ``processing_class`` (:func:`vpo.trainer.trl_compat.default_collator`).
        peft_config: a peft config to wrap the model with (TRL's habit), instead of ``args.use_lora``'s adapter.
        train_dataset / eval_dataset: a torch dataset of records, or anything :func:`vpo.data.open_preference_data`
            reads (a ``datasets.Dataset`` in TRL's layout, a path, rows).
        Other arguments go to ``transformers.Trainer``. Full fine-tuning with ``ref_mode`` auto/model and no
        ``ref_model`` gets a frozen copy of the initial model (or ``args.ref_model_path``) as the reference.

    Example:
        >>> from vpo.models import tiny_llava
        >>> from vpo.trainer import VPOConfig, VPOTrainer
        >>> from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records
        >>> tiny = tiny_llava()
        >>> args = VPOConfig(output_dir="/tmp/vpo-doc", max_steps=1, per_device_train_batch_size=2, report_to="none",
        ...                  use_cpu=True, lora_dropout=0.0)
        >>> trainer = VPOTrainer(tiny.model, args, train_dataset=synthetic_records(4, tiny),
        ...                      data_collator=TinyPreferenceCollator(tiny, "dpo"))
        >>> trainer.train().training_loss > 0
        True
    """

    # compute_loss returns the mean over pairs: the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model, args: VPOConfig, ref_model: Optional[torch.nn.Module] = None,
                 ref_table: Optional[Dict[str, Dict]] = None, data_collator=None, peft_config=None, **kwargs):
        if not isinstance(args, VPOConfig):
            raise ValueError(f"args must be a VPOConfig, got {type(args).__name__}")
        # TRL's constructor semantics (vpo.trainer.trl_options): a model path is loaded, no data is an error now, an
        # explicit ref_model is used (LoRA too), a PeftModel with peft_config is refused; dropout off by default.
        model, kwargs["processing_class"] = trl_options.resolve_model(model, args, kwargs.get("processing_class"))
        trl_options.check_constructor(model, args, ref_model, peft_config, kwargs.get("train_dataset"))
        if args.disable_dropout:
            trl_options.disable_dropout(model)
        trl_compat.check_plain_head(model, args.method)  # before any data is read
        # TRL's habits (vpo.trainer.trl_compat): datasets in any source/layout, the collator from processing_class,
        # peft_config, a frozen reference copy for full fine-tuning.
        for key in ("train_dataset", "eval_dataset"):
            kwargs[key] = trl_compat.open_dataset(kwargs.get(key), args, key, data_collator)
        if data_collator is None:
            data_collator = trl_compat.default_collator(kwargs.get("processing_class"), model, args)
        if args.ref_mode == "model" and ref_model is None:
            ref_model = trl_compat.load_reference(args) or trl_compat.reference_copy(model)
        if peft_config is not None and unwrap_peft(model) is None:
            model = trl_compat.apply_peft_config(model, peft_config)
        if unwrap_peft(model) is None:
            if args.use_lora:
                from transformers import set_seed

                set_seed(args.seed)  # the LoRA initialisation is part of the run
                model = apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                   targets=args.lora_target_list(), scope=args.lora_scope)
            elif args.freeze_vision:
                freeze_outside_language_model(model)
        if ref_model is not None and args.ref_mode == "adapter":  # auto chose the adapter; the explicit model wins
            args.ref_mode = "model"
        if args.ref_mode != "model":
            ref_model = None
        if args.ref_mode == "precomputed" and ref_table is None and args.ref_logps_path:
            ref_table = load_reference_table(args.ref_logps_path)

        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        self.model_accepts_loss_kwargs = False  # no num_items_in_batch: the loss is a mean over pairs
        # A collator with a call counter (vpo.data.PreferenceCollator.draw seeds TPO's per-call noise and mDPO's
        # crops): evaluation gets its own copy, and resuming restarts the counter where the run left it.
        self._eval_collator = copy.copy(data_collator) if hasattr(data_collator, "draw") else data_collator
        if hasattr(data_collator, "draw"):
            self.add_callback(_CollatorDrawCallback(data_collator))

        distributed.check_distributed_setup(self)  # FSDP1 / tensor parallel: a clear error
        if ref_model is not None:
            ref_model = distributed.prepare_reference(self, ref_model)  # sharded like the policy (FSDP2, ZeRO-3)
        self.ref_model = ref_model
        self.reference = Reference(args.ref_mode, model=ref_model, table=ref_table)
        self.bco = trl_options.RunningMean() if args.bco_running_mean else None  # BCO's δ, read by the loss
        args._vpo_bco_state = self.bco
        if args.sync_ref_model:  # TR-DPO
            self.add_callback(trl_options.sync_reference_callback(self))
        self.num_tokens = 0  # TRL's num_tokens: attended tokens trained on so far (vpo.trainer.metrics)
        self._tokens_since_log = torch.zeros((), dtype=torch.long, device=args.device)
        self._stored_metrics = defaultdict(lambda: defaultdict(list))
        self._skipped = defaultdict(lambda: defaultdict(int))
        self._eval_batches = {"used": 0, "skipped": 0}  # this evaluation's batches (evaluation_loop)
        self._online = self._setup_online(self.train_dataset)
        self._online_training_s = 0.0

    # -- OViP online ----------------------------------------------------------------------------------------------

    def _setup_online(self, dataset):
        """OViP's online data source (:mod:`vpo.trainer.online`): sample with the policy being trained."""
        if not is_online_dataset(dataset):
            if self.args.online:
                raise ValueError("online=True needs train_dataset = a vpo.online.OViPOnlineDataset "
                                 "(vpo.trainer.online.build_online_dataset(config, processor))")
            return None
        if dataset.buffer.batch_size != self._train_batch_size:
            raise ValueError(f"online OViP: the experience buffer hands out {dataset.buffer.batch_size} records per "
                             f"step but the training batch is {self._train_batch_size}: set "
                             "per_device_train_batch_size (or online_buffer_size) to the buffer size")
        if self.args.dataloader_num_workers != 0:
            raise ValueError("online OViP needs dataloader_num_workers=0: sampling must run in the training process, "
                             "on the live weights")
        if dataset.sample_fn is None:
            dataset.policy = self.model  # after LoRA: the peft-wrapped policy, not its DDP wrapper
        dataset.idle_when_empty = self.args.world_size > 1  # a rank without pairs steps with zero loss
        return dataset

    def get_train_dataloader(self):
        if self._online is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        # A plain loader, not accelerate's: that one fetches a batch ahead, so step t+1's pairs would be sampled before
        # step t's update (and, for an IterableDataset under DDP, on rank 0 only). The Trainer moves batches to the
        # device itself (_prepare_inputs).
        return DataLoader(self._online, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          num_workers=0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with distributed.step_context(self, model):  # ZeRO-3: the LM head stays gathered through the backward
            return self._training_step(model, inputs, num_items_in_batch)

    def _training_step(self, model, inputs, num_items_in_batch=None):
        if self._online is None:
            return super().training_step(model, inputs, num_items_in_batch)
        t0 = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.args.device.type == "cuda":
            torch.cuda.synchronize(self.args.device)
        self._online_training_s += time.perf_counter() - t0
        if self.accelerator.sync_gradients:  # the step's last micro-batch: its batches were all sampled by now
            metrics = self._online.pop_metrics()
            metrics["online/training_s"] = self._online_training_s
            self._online_training_s = 0.0
            self.store_metrics(metrics, "train")
        return loss

    def get_eval_dataloader(self, eval_dataset=None):
        train_collator, self.data_collator = self.data_collator, self._eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    # -- loss -----------------------------------------------------------------------------------------------------

    def _usable(self, inputs, split: str) -> bool:
        """Count the batch's skipped records under ``split`` and say whether it has rows and a scored token; under
        several processes the ranks agree (False on every rank if any rank's batch is unusable;
        :mod:`vpo.trainer.usable`)."""
        mark_unscored(inputs)  # rows without a scored token count as skipped (vpo.trainer.usable)
        self._count_skipped(inputs.get("skipped"), split)
        usable = batch_usable(inputs)
        return ranks_agree(usable, self.args.device) if self.args.world_size > 1 else usable

    def _loss_and_metrics(self, model, inputs, split: str):
        if not self._usable(inputs, split):
            return torch.zeros((), device=self.args.device, requires_grad=True), {}
        return self._method_loss(model, inputs)

    def _method_loss(self, model, inputs):
        """The method's loss and metrics on a usable batch."""
        passes = Passes(inputs, model, self.reference, list_size=self.args.list_size,
                        need_grad=torch.is_grad_enabled(), impl=self.args.loss_impl)
        loss, metrics = compute(passes, self.args)
        if distributed.placeholder_batch(inputs):  # OViP: this rank found no pair; it steps with a zero gradient
            return distributed.zero_loss(loss), {}
        return loss, metrics

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        loss, metrics = self._loss_and_metrics(model, inputs, "train")
        self.store_metrics(metrics, "train")
        if self.bco is not None and "rewards/chosen" in metrics:  # the batch's mean reward, for the next steps' δ
            self.bco.update((metrics["rewards/chosen"] + metrics["rewards/rejected"]) / 2)
        # TRL's num_tokens (vpo.trainer.metrics): no host sync here, summed at the next log
        self._tokens_since_log = self._tokens_since_log + count_tokens(inputs).to(self._tokens_since_log.device)
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only: bool, ignore_keys=None):
        """``(loss, None, None)`` for a usable batch (its metrics are stored for the evaluation's log);
        ``(None, None, None)`` for a batch with no rows (every record skipped) or no scored token, which the
        evaluation loop then leaves out of the loss mean (the metric means never see it) and
        :meth:`evaluation_loop` counts. Under several processes the ranks agree, as in training: if any rank's batch
        is unusable, every rank leaves this step out."""
        ids = inputs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.shape[0] > 0:
            inputs = self._prepare_inputs(inputs)
        if not self._usable(inputs, "eval"):
            self._eval_batches["skipped"] += 1
            return None, None, None
        with torch.no_grad(), self.compute_loss_context_manager(), distributed.step_context(self, model):
            loss, metrics = self._method_loss(model, inputs)
        self.store_metrics(metrics, "eval")
        self._eval_batches["used"] += 1
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """The Trainer's loop over only the usable batches: adds ``<prefix>_skipped_batches`` (the batches left out
        of the loss and metric means, summed over processes) and raises ValueError when no batch was usable, instead
        of a loss from nothing."""
        self._eval_batches = {"used": 0, "skipped": 0}
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        used, skipped = self._eval_batches["used"], self._eval_batches["skipped"]
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(used, skipped)])  # every process evaluates: a collective is safe here
            used, skipped = sum(u for u, _ in parts), sum(s for _, s in parts)
        if used == 0:  # the ranks agree per batch, so every process raises together
            self._stored_metrics.pop("eval", None)
            reasons = dict(self._skipped.pop("eval", {}))
            what = (f"all {skipped} batches were skipped (records skipped: {reasons or 'none'})" if skipped else
                    "it gave no batch")
            raise ValueError(f"{_dataset_argument(metric_key_prefix)}: no evaluation batch has a scored token: "
                             f"{what}; nothing to report a loss from")
        output.metrics[f"{metric_key_prefix}_skipped_batches"] = float(skipped)
        return output

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """``Trainer.save_model`` plus a filled model card (``README.md``, :mod:`vpo.trainer.model_card`)."""
        super().save_model(output_dir, _internal_call)
        if not _internal_call and self.args.should_save:
            from vpo.trainer.model_card import write_model_card

            write_model_card(self, output_dir or self.args.output_dir)

    # -- metrics --------------------------------------------------------------------------------------------------

    def store_metrics(self, metrics: Dict[str, torch.Tensor], split: str = "train") -> None:
        """Keep this step's (detached) metrics until the next log; no host sync here."""
        for key, value in metrics.items():
            self._stored_metrics[split][key].append(value.detach() if isinstance(value, torch.Tensor) else value)

    def _count_skipped(self, skipped, split: str) -> None:
        if skipped is None:
            return
        if isinstance(skipped, dict):
            items = skipped.items()
        else:
            items = [("total", skipped)]
        for reason, count in items:
            self._skipped[split][str(reason)] += int(count)

    def _flush(self, split: str) -> Dict[str, float]:
        """Means of the stored metrics and sums of the skip counts since the last log, over all processes."""
        stored = self._stored_metrics.pop(split, {})
        skipped = self._skipped.pop(split, {})
        local = {}
        if stored:
            keys = sorted(stored)
            device = self.args.device
            sums = torch.stack([torch.stack([torch.as_tensor(v, device=device).float().reshape(()) for v in stored[k]])
                                .sum() for k in keys]).tolist()  # one host sync per log
            local = {k: (total, len(stored[k])) for k, total in zip(keys, sums)}
        # the training tokens since the last log (of either split), summed over processes below
        local[_TOKENS] = (float(self._tokens_since_log), 1)
        self._tokens_since_log.zero_()
        parts = [(local, dict(skipped))]
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            parts = gather_object(parts)  # every process logs: keys may differ (skip reasons), so gather objects
        totals: Dict[str, list] = {}
        counts: Dict[str, int] = defaultdict(int)
        for metric_part, skip_part in parts:
            for k, (total, n) in metric_part.items():
                acc = totals.setdefault(k, [0.0, 0])
                acc[0] += total
                acc[1] += n
            for reason, n in skip_part.items():
                counts[reason] += n
        self.num_tokens += int(totals.pop(_TOKENS, (0.0, 0))[0])
        out = {k: total / max(n, 1) for k, (total, n) in totals.items()}
        if out:  # TRL's running total (the training one, in eval logs too); not in a log without metrics
            out["num_tokens"] = float(self.num_tokens)
        out.update({f"data/skipped_{reason}": float(n) for reason, n in counts.items()})
        return out

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = "eval_" if split == "eval" else ""
        for key, value in self._flush(split).items():
            logs[f"{prefix}{key}"] = value
        return super().log(logs, start_time)


def _dataset_argument(metric_key_prefix: str) -> str:
    """The argument an evaluation's data came from, for errors: ``eval_dataset``, ``eval_dataset['name']`` (a dict of
    eval datasets), ``test_dataset`` (``predict``)."""
    if metric_key_prefix == "eval":
        return "eval_dataset"
    if metric_key_prefix.startswith("eval_"):
        return f"eval_dataset[{metric_key_prefix[len('eval_'):]!r}]"
    return f"{metric_key_prefix}_dataset"


class _CollatorDrawCallback(TrainerCallback):
    """Sets the collator's call counter to the number of batches the run has consumed, at the start of training
    (0 for a new run, ``global_step × gradient_accumulation_steps`` when resuming), so a resumed run draws the same
    per-call randomness as the uninterrupted one (single-process data loading)."""

    def __init__(self, collator):
        self.collator = collator

    def on_train_begin(self, args, state, control, **kwargs):
        self.collator.draw = state.global_step * args.gradient_accumulation_steps
