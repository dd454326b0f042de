"""Fault tolerance for :class:`vpo.trainer.VPOTrainer`: atomic checkpoints, honest resume, no phantom steps.

:class:`ResumeMixin` sits in front of ``transformers.Trainer`` in ``VPOTrainer``'s bases and overrides:

- ``train``: runs :func:`vpo.trainer.preflight.preflight_trainer` (output folder writable, room for a checkpoint)
  before anything is computed; resolves ``resume_from_checkpoint`` with :func:`vpo.trainer.checkpoint.resolve_resume`
  (``True`` / ``"last"``: the newest COMPLETE checkpoint, an error naming the folder if there is none), says which
  one it loads and warns about every newer incomplete one it passed over; restores vpo's own state (below); at the
  end prints the total of skipped records per reason, writes it to ``<output_dir>/skipped.json`` and adds it to
  ``state.log_history``.
- ``_save_checkpoint``: the Trainer writes into a staging folder (``_get_output_dir`` points there during the save),
  vpo adds its state, then the main process publishes the folder atomically
  (:func:`vpo.trainer.checkpoint.publish_checkpoint`) between two barriers and rotates complete checkpoints only.
- ``get_batch_samples`` / ``training_step``: a micro-batch with no usable record (every record skipped by the
  collator) is never trained on: the next batch is drawn instead. An optimizer step is made of real micro-batches
  only (its loss is their mean); if the epoch runs out first the step is padded with empty micro-batches that
  weigh nothing, and if nothing real is left no step is taken at all — the global step, the scheduler and
  ``max_steps`` only count real steps. A run whose every batch is unusable stops with an error naming the first
  skip reason. A batch with rows but no scored token counts as unusable too (:mod:`vpo.trainer.usable`). Under
  several processes no batch is drawn ahead: the ranks agree to skip an unusable one with a zero loss.

vpo's state in a checkpoint (``vpo_state.json``, ``vpo_state_<rank>.json`` under several processes): the data cursor
(epoch, micro-batches trained and extra batches drawn in it, raw batches drawn so far — the collator's ``draw``
counter that seeds TPO's noise and mDPO's crops), the skip totals, the evaluation collator's counter, and OViP's
online stream (:func:`vpo.trainer.online.save_online_state`). On resume the Trainer's own fast-forward is aimed with
the cursor (``_init_training_state``), so a run that drew extra batches resumes at the same record; the Trainer
restores the Python / NumPy / torch RNGs (dropout) itself.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from typing import Any, Dict, Optional

import torch

from vpo.trainer.checkpoint import (
    CheckpointError,
    publish_checkpoint,
    resolve_resume,
    rotate_complete,
    staging_dir,
    write_manifest,
)
from vpo.trainer.usable import mark_unscored

logger = logging.getLogger(__name__)
STATE_FORMAT = 1
SKIPPED_FILE = "skipped.json"


def state_file(world_size: int, rank: int) -> str:
    return "vpo_state.json" if world_size <= 1 else f"vpo_state_{rank}.json"


def is_empty_batch(batch: Any) -> bool:
    """Whether a collated batch has no usable record (the collators' contract: no ``input_ids`` or zero rows)."""
    if not isinstance(batch, dict):
        return False
    ids = batch.get("input_ids")
    return ids is None or (isinstance(ids, torch.Tensor) and ids.shape[0] == 0)


def _pad_batch() -> Dict[str, Any]:
    # A micro-batch that weighs nothing: VPOTrainer returns a zero loss for zero rows (and the Trainer rejects {}).
    return {"input_ids": torch.zeros(0, 1, dtype=torch.long), "vpo_pad": True}


def _skip_items(skipped) -> Dict[str, int]:
    if skipped is None:
        return {}
    if isinstance(skipped, dict):
        return {str(k): int(v) for k, v in skipped.items()}
    return {"total": int(skipped)}


class ResumeMixin:
    """Atomic checkpoints, honest resume and no phantom steps for a ``transformers.Trainer`` (module docstring).
    Put it before ``Trainer`` in the bases: ``class VPOTrainer(ResumeMixin, Trainer)``."""

    _vpo_staging: Optional[str] = None
    _vpo_real_in_step = 0

    # ------------------------------------------------------------------------------------------------- state
    def _vpo_reset(self) -> None:
        self._vpo_staging = None
        self._vpo_resumed: Optional[Dict[str, Any]] = None
        self._vpo_iterator = None
        self._vpo_epoch = -1
        self._vpo_entries = 0  # micro-batches handed to the Trainer in the current epoch
        self._vpo_extra = 0  # batches drawn beyond them in the current epoch (the unusable ones)
        self._vpo_epoch_done = False
        self._vpo_raw = 0  # batches drawn from the loader since the run began (= the collator's draw counter)
        self._vpo_discard = 0
        self._vpo_start = (0, 0)
        self._vpo_real = 0  # micro-batches trained on since the run began
        self._vpo_dropped = 0
        self._vpo_skip_totals: Counter = Counter()
        self._vpo_first_reason: Optional[str] = None
        self._vpo_real_in_step = 0

    def _vpo_state(self) -> Dict[str, Any]:
        eval_collator = getattr(self, "_eval_collator", None)
        return {
            "format": STATE_FORMAT, "global_step": self.state.global_step, "epoch": self._vpo_epoch,
            "entries_in_epoch": self._vpo_entries, "extra_in_epoch": self._vpo_extra,
            "epoch_done": self._vpo_epoch_done, "raw_batches": self._vpo_raw, "real_batches": self._vpo_real,
            "dropped_batches": self._vpo_dropped, "skipped_total": dict(self._vpo_skip_totals),
            "first_skip_reason": self._vpo_first_reason,
            # TRL's running num_tokens (vpo.trainer.metrics): the total at the last log, and this process's since
            "num_tokens": int(getattr(self, "num_tokens", 0)),
            "num_tokens_pending": int(getattr(self, "_tokens_since_log", 0)),
            "bco_running_mean": self.bco.state_dict() if getattr(self, "bco", None) is not None else None,
            "eval_draw": getattr(eval_collator, "draw", None) if eval_collator is not self.data_collator else None,
        }

    def _vpo_load_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, state_file(self.args.world_size, self.args.process_index))
        if not os.path.isfile(path):  # a checkpoint from before vpo kept its state: the Trainer's own derivation
            logger.warning("%s has no %s: resuming with the Trainer's data position (exact unless batches were "
                           "skipped before the checkpoint)", checkpoint, os.path.basename(path))
            return
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        self._vpo_resumed = state
        self._vpo_skip_totals = Counter(state.get("skipped_total", {}))
        self._vpo_first_reason = state.get("first_skip_reason")
        self._vpo_real = int(state.get("real_batches", 0))
        self._vpo_dropped = int(state.get("dropped_batches", 0))
        self.num_tokens = int(state.get("num_tokens", 0))
        if getattr(self, "bco", None) is not None and state.get("bco_running_mean"):
            self.bco.load_state_dict(state["bco_running_mean"])
        if hasattr(self, "_tokens_since_log"):
            self._tokens_since_log.fill_(int(state.get("num_tokens_pending", 0)))
        eval_collator = getattr(self, "_eval_collator", None)
        if state.get("eval_draw") is not None and hasattr(eval_collator, "draw"):
            eval_collator.draw = int(state["eval_draw"])

    # ------------------------------------------------------------------------------------------------- train
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        from vpo.trainer.preflight import preflight_trainer

        self._vpo_reset()
        preflight_trainer(self)
        path, skipped = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if self.args.process_index == 0:
            for bad, why in skipped:
                _say(f"vpo: WARNING: skipped the incomplete checkpoint {bad} ({why}); it is left as it is")
        if path is not None:
            self._vpo_load_state(path)
            online = getattr(self, "_online", None)
            if online is not None:
                from vpo.trainer.online import load_online_state

                load_online_state(online, path, world_size=self.args.world_size, rank=self.args.process_index)
            if self.args.process_index == 0:
                with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
                    step = json.load(f)["global_step"]
                _say(f"vpo: resuming from {path} (global step {step})")
        output = super().train(resume_from_checkpoint=path, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                               **kwargs)
        self._vpo_finish()
        return output

    def _vpo_finish(self) -> None:
        """Total skip counts over all processes: printed, saved to ``skipped.json``, appended to the log history."""
        totals = Counter(self._vpo_skip_totals)
        dropped = self._vpo_dropped
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            parts = gather_object([(dict(totals), dropped)])
            totals, dropped = Counter(), 0
            for part, d in parts:
                totals.update(part)
                dropped += d
        total = int(sum(totals.values()))
        record = {"total": total, "by_reason": dict(sorted(totals.items())), "dropped_batches": dropped,
                  "global_step": self.state.global_step, "max_steps": self.state.max_steps}
        self.state.log_history.append({"data/skipped_total": float(total),
                                       **{f"data/skipped_total_{k}": float(v) for k, v in totals.items()},
                                       "step": self.state.global_step})
        if not self.args.should_save:
            return
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, SKIPPED_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        _say(f"vpo: skipped records: TOTAL {total}" + (f" {dict(sorted(totals.items()))}" if total else ""))
        if dropped and self.state.global_step < self.state.max_steps:
            _say(f"vpo: WARNING: {dropped} batches had no usable record and were not trained on: the run took "
                 f"{self.state.global_step} of max_steps={self.state.max_steps} optimizer steps before the data "
                 "ran out")

    # ---------------------------------------------------------------------------------------- data position
    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        epochs, steps = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                     resume_from_checkpoint, trial)
        cursor = self._vpo_resumed
        if resume_from_checkpoint is not None and cursor is not None and int(cursor.get("epoch", -1)) >= 0:
            epoch, raw = int(cursor["epoch"]), int(cursor["raw_batches"])
            if cursor.get("epoch_done"):  # the epoch was drawn to its end: start the next one
                epochs, steps = epoch + 1, 0
            elif not self.args.ignore_data_skip:
                # The Trainer skips `steps` batches without collating them; the extra ones drawn after them are
                # drawn (collated) again and dropped, so the collator's counter resumes before them.
                epochs, steps = epoch, int(cursor["entries_in_epoch"])
                self._vpo_discard = int(cursor["extra_in_epoch"])
                raw -= self._vpo_discard
            else:
                epochs = epoch
            self._vpo_raw = raw
        self._vpo_start = (epochs, steps)
        self._vpo_epoch = epochs - 1
        return epochs, steps

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if epoch_iterator is not self._vpo_iterator:  # a new epoch (or the resumed one)
            first = self._vpo_iterator is None
            self._vpo_iterator = epoch_iterator
            self._vpo_epoch += 1
            resumed = first and self._vpo_resumed is not None
            self._vpo_entries = self._vpo_start[1] if first else 0
            self._vpo_extra = 0
            self._vpo_epoch_done = False
            if resumed and hasattr(self.data_collator, "draw"):
                self.data_collator.draw = self._vpo_raw
            for _ in range(self._vpo_discard if first else 0):  # the extra batches the interrupted run drew
                try:
                    next(epoch_iterator)
                except StopIteration:
                    break
                self._vpo_raw += 1
                self._vpo_extra += 1
            self._vpo_discard = 0
        if self.args.world_size > 1:  # every process must take the same steps: no drawing ahead (module docstring)
            batches, n_items = super().get_batch_samples(epoch_iterator, num_batches, device)
            for batch in batches:
                mark_unscored(batch)
                self._vpo_note_skips(batch)
            self._vpo_raw += len(batches)
            self._vpo_real += len(batches)
            self._vpo_entries += len(batches)
            self._vpo_real_in_step = len(batches)
            return batches, n_items
        real = []
        while len(real) < num_batches:
            try:
                batch = next(epoch_iterator)
            except StopIteration:
                self._vpo_epoch_done = True
                break
            self._vpo_raw += 1
            unscored = mark_unscored(batch)  # rows but no scored token: skipped too (vpo.trainer.usable)
            self._vpo_note_skips(batch)
            if unscored or is_empty_batch(batch):
                self._vpo_dropped += 1
                self._vpo_extra += 1
                count = getattr(self, "_count_skipped", None)
                if count is not None:  # the per-log counts: this batch never reaches compute_loss
                    count(batch.get("skipped"), "train")
                continue
            real.append(batch)
        if self._vpo_epoch_done and self._vpo_real == 0 and not real and self._vpo_raw > 0:
            raise ValueError(f"no usable record in the training data: all {self._vpo_raw} batches were skipped "
                             f"(first reason: {self._vpo_first_reason}; counts "
                             f"{dict(self._vpo_skip_totals)})")
        self._vpo_real += len(real)
        self._vpo_real_in_step = len(real)
        if real and len(real) < num_batches:  # the epoch ran out: pad so the Trainer still closes the step
            pads = num_batches - len(real)
            real.extend(_pad_batch() for _ in range(pads))
            self._vpo_extra -= pads
        self._vpo_entries += len(real)
        return real, self._get_num_items_in_batch(real, device)

    def _vpo_note_skips(self, batch) -> None:
        if not isinstance(batch, dict):
            return
        for reason, n in _skip_items(batch.get("skipped")).items():
            if n:
                self._vpo_skip_totals[reason] += n
                if self._vpo_first_reason is None:
                    self._vpo_first_reason = reason

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The Trainer divides each micro-batch's loss by the number it fetched; pads weigh nothing, so divide by the
        # number of real ones: the step's loss is the mean over its real micro-batches.
        if 0 < self._vpo_real_in_step < self.current_gradient_accumulation_steps:
            self.current_gradient_accumulation_steps = self._vpo_real_in_step
        return super().training_step(model, inputs, num_items_in_batch)

    # ----------------------------------------------------------------------------------------------- saving
    def _get_output_dir(self, trial):
        return self._vpo_staging if self._vpo_staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = self._get_output_dir(trial)
        name = f"checkpoint-{self.state.global_step}"
        stage_root = staging_dir(run_dir, self.state.global_step)
        final = os.path.join(run_dir, name)
        if self.args.should_save and os.path.lexists(stage_root):
            _say(f"vpo: removing the unfinished staging folder {stage_root} of an earlier save")
            import shutil

            shutil.rmtree(stage_root)
        self.accelerator.wait_for_everyone()
        self._vpo_staging = stage_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._vpo_staging = None
        staged = os.path.join(stage_root, name)
        os.makedirs(staged, exist_ok=True)
        self._vpo_write_state(staged)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best is not None and os.path.abspath(best) == os.path.abspath(staged):
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            write_manifest(staged)
            displaced = publish_checkpoint(staged, final)
            os.rmdir(stage_root)
            if displaced:
                _say(f"vpo: WARNING: {final} already existed; moved it to {displaced} before saving this step")
            rotate_complete(run_dir, self.args.save_total_limit, keep=(final, self.state.best_model_checkpoint),
                            resumable=not self.args.save_only_model)
        self.accelerator.wait_for_everyone()

    def _vpo_write_state(self, folder: str) -> None:
        rank, world = self.args.process_index, self.args.world_size
        with open(os.path.join(folder, state_file(world, rank)), "w", encoding="utf-8") as f:
            json.dump(self._vpo_state(), f, indent=1)
        online = getattr(self, "_online", None)
        if online is not None:
            from vpo.trainer.online import save_online_state

            save_online_state(online, folder, world_size=world, rank=rank)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


__all__ = ["CheckpointError", "ResumeMixin", "SKIPPED_FILE", "is_empty_batch", "state_file"]
