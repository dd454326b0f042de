"""Checkpoints that are either complete or invisible, and resuming from the newest complete one.

Saving (:class:`vpo.trainer.resume.ResumeMixin` calls :func:`publish_checkpoint`): the Trainer writes
``checkpoint-N`` into a staging folder ``<output_dir>/.staging-checkpoint-N/``; once every process has written its
part (a barrier), the main process writes a manifest (:data:`MANIFEST`: every file with its size), fsyncs the files,
and renames the folder to ``<output_dir>/checkpoint-N`` (one ``rename`` on the same filesystem: atomic). A kill at
any moment leaves either the complete ``checkpoint-N`` or a ``.staging-*`` folder that nothing reads. A folder
already named ``checkpoint-N`` (a partial one from an older version, or a later step of a run resumed from an
earlier checkpoint) is moved aside to ``displaced-checkpoint-N[-k]`` with a warning, never deleted. Rotation
(``save_total_limit``) then counts complete checkpoints only; incomplete folders are left alone.

Resuming (:func:`resolve_resume`): ``True`` / ``"true"`` / ``"last"`` pick the newest checkpoint that passes
:func:`checkpoint_problem`, which does not trust the folder's name or the manifest alone — so a partial folder left
by an older vpo, stock transformers, a full disk or an interrupted copy is recognised too:

- ``trainer_state.json`` parses and holds an integer ``global_step``;
- model weights are present (full ``model.safetensors`` / ``pytorch_model.bin`` or their sharded index with every
  shard, a peft ``adapter_model.*``, an FSDP ``pytorch_model_fsdp_*`` folder, or a DeepSpeed ``global_step*``
  folder);
- the optimizer and scheduler states are present (``optimizer.pt`` / ``optimizer.bin`` / an ``optimizer*`` folder
  and ``scheduler.pt``; DeepSpeed keeps both in its ``global_step*`` folder);
- every ``.safetensors`` file is as long as its header says, every ``.pt`` / ``.pth`` / ``.bin`` torch file is a
  readable zip archive (its central directory sits at the end: a truncated file fails), every ``.json`` parses;
- with a manifest, every listed file exists with the listed size.

An explicit path that fails is an error naming the reason; ``"last"`` with no complete checkpoint is an error naming
the folder (and why each candidate was rejected).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

MANIFEST = "vpo_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
STAGING_PREFIX = ".staging-"
DISPLACED_PREFIX = "displaced-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
LAST = ("true", "last")


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for (the message names the folder and the reason)."""


# ------------------------------------------------------------------------------------------------------ validation
def checkpoint_problem(path: str, *, resumable: bool = True) -> Optional[str]:
    """Why ``path`` is not a complete, resumable checkpoint, or ``None`` if it is (module docstring lists the checks).
    ``resumable=False`` does not ask for the optimizer and scheduler states (a ``save_only_model`` checkpoint).

    Example:
        >>> checkpoint_problem("/nonexistent/checkpoint-3")
        'not a folder'
    """
    if not os.path.isdir(path):
        return "not a folder"
    names = set(os.listdir(path))
    problem = _manifest_problem(path, names)
    if problem:
        return problem
    if TRAINER_STATE not in names:
        return f"no {TRAINER_STATE}"
    try:
        with open(os.path.join(path, TRAINER_STATE), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{TRAINER_STATE} does not parse ({type(e).__name__}: {e})"
    if not isinstance(state, dict) or isinstance(state.get("global_step"), bool) \
            or not isinstance(state.get("global_step"), int):
        return f"{TRAINER_STATE} has no integer global_step"
    deepspeed = any(n.startswith("global_step") and os.path.isdir(os.path.join(path, n)) for n in names)
    problem = _weights_problem(path, names, deepspeed)
    if problem:
        return problem
    if resumable and not deepspeed:
        optimizer = ("optimizer.pt" in names or "optimizer.bin" in names
                     or any(n.startswith("optimizer") and os.path.isdir(os.path.join(path, n)) for n in names))
        if not optimizer:
            return "no optimizer state (optimizer.pt)"
        if "scheduler.pt" not in names:
            return "no scheduler state (scheduler.pt)"
    for name in sorted(names):
        problem = _file_problem(os.path.join(path, name))
        if problem:
            return f"{name}: {problem}"
    return None


def _manifest_problem(path: str, names) -> Optional[str]:
    if MANIFEST not in names:
        return None  # an older vpo / stock transformers checkpoint: the content checks decide
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} does not parse ({type(e).__name__})"
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is listed in {MANIFEST} but missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {MANIFEST} says {size}"
    return None


def _weights_problem(path: str, names, deepspeed: bool) -> Optional[str]:
    if deepspeed or any(n in names for n in _WEIGHTS):
        return None
    for index in _WEIGHT_INDEXES:
        if index in names:
            try:
                with open(os.path.join(path, index), encoding="utf-8") as f:
                    shards = set(json.load(f)["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError) as e:
                return f"{index} does not parse ({type(e).__name__})"
            missing = sorted(s for s in shards if not os.path.isfile(os.path.join(path, s)))
            return f"weight shards missing: {missing}" if missing else None
    for n in names:  # FSDP's sharded model folder, or a peft model saved with named adapters in sub-folders
        sub = os.path.join(path, n)
        if os.path.isdir(sub) and (n.startswith("pytorch_model_fsdp")
                                   or any(os.path.isfile(os.path.join(sub, w)) for w in _WEIGHTS[2:])):
            return None
    return "no model weights (model.safetensors, adapter_model.safetensors, ...)"


def _file_problem(full: str) -> Optional[str]:
    """A cheap integrity check of one file by its type (truncation shows at the end of a zip or a safetensors)."""
    if not os.path.isfile(full):
        return None
    size = os.path.getsize(full)
    if full.endswith(".safetensors"):
        try:
            with open(full, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            return f"unreadable safetensors header ({type(e).__name__})"
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if size < 8 + n + end:
            return f"truncated ({size} bytes, the header needs {8 + n + end})"
    elif full.endswith(_TORCH_SUFFIXES):
        if not zipfile.is_zipfile(full):
            return "truncated or not a torch.save file"
    elif full.endswith(".json"):
        try:
            with open(full, encoding="utf-8") as f:
                json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            return f"does not parse ({type(e).__name__})"
    return None


# --------------------------------------------------------------------------------------------------------- finding
def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-N`` folder in ``output_dir``, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    out = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            out.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(out)


def latest_complete_checkpoint(output_dir: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The newest complete checkpoint in ``output_dir`` (or ``None``), and the newer incomplete ones passed over as
    ``(path, reason)``."""
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def resolve_resume(value, output_dir: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The checkpoint to resume from for ``resume_from_checkpoint=value``, and the incomplete ones skipped.

    ``None`` / ``False`` / ``""`` / ``"false"``: no resume. ``True`` / ``"true"`` / ``"last"``: the newest complete
    checkpoint in ``output_dir`` (:class:`CheckpointError` naming the folder if there is none). A path: that
    checkpoint, which must be complete (:class:`CheckpointError` with the reason otherwise).
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false", "none")):
        return None, []
    if value is True or (isinstance(value, str) and value.strip().lower() in LAST):
        path, skipped = latest_complete_checkpoint(output_dir)
        if path is None:
            found = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped)
            raise CheckpointError(f"resume_from_checkpoint={value}: no complete checkpoint in {output_dir}"
                                  + (f" (incomplete: {found})" if found else ""))
        return path, skipped
    if not isinstance(value, (str, os.PathLike)):
        raise CheckpointError(f"resume_from_checkpoint must be a path, true/last or None, got {value!r}")
    path = os.fspath(value)
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"resume_from_checkpoint={path}: not a complete checkpoint ({problem})")
    return path, []


# ---------------------------------------------------------------------------------------------------------- saving
def staging_dir(run_dir: str, step: int) -> str:
    """Where the Trainer writes ``checkpoint-<step>`` before it is published: ``<run_dir>/.staging-checkpoint-N``."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}checkpoint-{step}")


def write_manifest(folder: str) -> Dict[str, int]:
    """Fsync every file under ``folder`` and write :data:`MANIFEST` (``{"files": {relative path: size}}``)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel == MANIFEST:
                continue
            _fsync(full)
            files[rel] = os.path.getsize(full)
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": 1, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))
    return files


def publish_checkpoint(staged: str, final: str) -> Optional[str]:
    """Rename the finished checkpoint ``staged`` to ``final``. An existing ``final`` is moved aside first (to
    ``displaced-<name>[-k]`` next to it); returns where it went, or ``None``."""
    displaced = None
    if os.path.lexists(final):
        parent, name = os.path.split(final)
        displaced = os.path.join(parent, DISPLACED_PREFIX + name)
        k = 1
        while os.path.lexists(displaced):
            k += 1
            displaced = os.path.join(parent, f"{DISPLACED_PREFIX}{name}-{k}")
        os.rename(final, displaced)
    os.rename(staged, final)
    _fsync_dir(os.path.dirname(final))
    return displaced


def rotate_complete(run_dir: str, limit: Optional[int], keep: Sequence[str] = (), *, resumable: bool = True
                    ) -> List[str]:
    """Delete the oldest COMPLETE checkpoints beyond ``limit`` (``save_total_limit``), never one in ``keep`` (the
    newest, the best); incomplete folders are neither counted nor touched. ``resumable=False``: checkpoints without
    optimizer state count as complete (``save_only_model``). Returns the deleted paths."""
    if not limit or limit <= 0:
        return []
    complete = [p for _, p in list_checkpoints(run_dir) if checkpoint_problem(p, resumable=resumable) is None]
    protected = {os.path.abspath(p) for p in keep if p}
    excess = len(complete) - max(limit, len(protected & {os.path.abspath(p) for p in complete}))
    deleted = []
    for path in complete:
        if excess <= 0:
            break
        if os.path.abspath(path) in protected:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
        excess -= 1
    return deleted


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    _fsync(path)  # a directory's entries (the rename) reach the disk with an fsync of the directory (POSIX)
