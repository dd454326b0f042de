"""mDPO's crops (docs/methods.md, mDPO): a random crop keeping 1-20% of the image, one crop shared by policy and
reference.

mDPO's code corrupts the image with ``RandomResizedCrop(scale=(0.01, 0.2))``: the crop keeps only 1-20% of the area,
so the conditional term compares the image with a very different one. The crop itself is the collator's
(:func:`vpo.data.collator.crop_box`): a box keeping a fraction ``a ~ U(keep)`` of the area (``keep`` default
``(0.01, 0.2)``), the aspect ratio kept (mDPO also draws it from ``(3/4, 4/3)``; here the image's), the sides
rounded UP (so at least ``a`` is kept), at a uniform position, drawn from ``(seed, record id, draw)``. ``max_frac``
selects the older crop instead (removing ``f ~ U(0, max_frac)``). :func:`mdpo_crop_box` calls that very code, so a crop recorded here
is the crop the collator draws for the same ``(seed, id, draw)``; the collator then resizes the crop back to the
image's size, and the trainer runs the policy and the reference on that one sub-batch (docs/methods.md's **[choice]**:
one crop for both; the mDPO code draws two).

:func:`write_mdpo_dataset` records, per example, the crop of ``draw = 0`` (one fixed crop per example) in the row:
``mdpo = {"crop_box": [l, t, r, b], "kept": fraction of the area, "removed": 1 - kept, "seed", "keep",
"max_frac", "crop_image"?}``, and with
``save_images=True`` the cropped-and-resized image (``out_dir/images/{id}_crop.png``) that the collator's ``crop``
pass encodes. The collator (``method="mdpo"``) uses a row's recorded ``mdpo.crop_box`` on every call, so training
on this dataset sees exactly the recorded crop every epoch (what ``ref_mode: precomputed`` needs); without a
recorded box it draws its own crop per call (``draw`` = its call counter), or draw 0's every call with
``fixed_noise`` — the crop recorded here for the same ``seed``.

Example:
    >>> box = mdpo_crop_box("rec-0", 64, 64, seed=0)
    >>> l, t, r, b = box
    >>> 0.01 <= (r - l) * (b - t) / (64 * 64) <= 0.25
    True
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

from vpo.construct._io import (
    read_source,
    records_with_images,
    ConstructionSummary,
    JsonlWriter,
    check_int,
    check_path,
    data_file,
    record_row,
    safe_name,
    save_png,
    write_meta,
)


def mdpo_crop_box(record_id: str, width: int, height: int, *, seed: int = 0, max_frac: Optional[float] = None,
                  draw: int = 0, keep: Tuple[float, float] = (0.01, 0.2)) -> Tuple[int, int, int, int]:
    """mDPO's crop of ``record_id`` in a ``width x height`` image: ``(left, top, right, bottom)`` pixels, end-exclusive,
    keeping a fraction of the area drawn in ``keep`` (at least that much: the sides round up; tiny images keep more),
    or — with ``max_frac`` — removing one in ``[0, max_frac]``; deterministic in ``(seed, record_id, draw)`` and equal
    to ``PreferenceCollator(..., seed=seed, crop_keep=keep, crop_max_frac=max_frac).crop_box(record_id, width,
    height, draw)`` (:func:`vpo.data.collator.crop_box`, with the arguments checked)."""
    from vpo._validate import check_range
    from vpo.data.collator import crop_box

    if not isinstance(record_id, str) or not record_id:
        raise ValueError(f"record_id must be a non-empty string, got {record_id!r}")
    check_int("width", width, 1)
    check_int("height", height, 1)
    check_int("seed", seed)
    check_int("draw", draw, 0)
    if max_frac is not None:
        check_range("max_frac", max_frac, 0.0, 1.0, hi_open=True)
        max_frac = float(max_frac)
    keep = _check_keep(keep)
    return tuple(int(v) for v in crop_box(record_id, width, height, seed=seed, max_frac=max_frac, draw=draw,
                                          keep=keep))


def _check_keep(keep) -> Tuple[float, float]:
    ok = isinstance(keep, (tuple, list)) and len(keep) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in keep)
    if not ok or not 0.0 < keep[0] <= keep[1] <= 1.0:
        raise ValueError(f"keep must be (lo, hi) with 0 < lo <= hi <= 1 (the fraction of the area kept), got {keep!r}")
    return float(keep[0]), float(keep[1])


def removed_fraction(box: Tuple[int, int, int, int], width: int, height: int) -> float:
    """The fraction of the image area outside ``box``."""
    l, t, r, b = box
    return 1.0 - (r - l) * (b - t) / float(width * height)


def crop_image(image, box: Tuple[int, int, int, int], *, resize: bool = True):
    """The crop of ``image`` (a PIL image) at ``box``, resized back to the image's size (bicubic) when ``resize``, as
    the collator feeds it to the model."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
    out = image.convert("RGB").crop(tuple(box))
    return out.resize(image.size, Image.Resampling.BICUBIC) if resize else out


def write_mdpo_dataset(
    data_path: str,
    out_dir: str,
    *,
    seed: int = 0,
    max_frac: Optional[float] = None,
    save_images: bool = False,
    keep: Tuple[float, float] = (0.01, 0.2),
    limit: Optional[int] = None,
) -> ConstructionSummary:
    """Copy a preference dataset to ``out_dir`` with each example's mDPO crop recorded (module docstring).

    Args:
        data_path: a ``.jsonl`` file or a folder with ``train.jsonl`` (any layout :mod:`vpo.data` reads).
        out_dir: the output folder (``train.jsonl``, ``construct.json``, ``images/`` when ``save_images``).
        seed: the crop seed (use the collator's ``seed`` so the collator's first-call crops equal these).
        max_frac: None (default): the crop keeps a fraction of the area in ``keep`` (mDPO's code: 1-20%); a number
            in [0, 1): the older crop removing at most that fraction.
        keep: the range of the kept fraction of the area, ``0 < lo <= hi <= 1``.
        save_images: also save the cropped-and-resized images and record their paths (``mdpo.crop_image``).
        limit: use only the first ``limit`` readable records.

    Returns:
        A :class:`~vpo.construct.ConstructionSummary`; unreadable images are skipped as ``unreadable_image``.
    """
    from vpo._validate import check_range

    src = data_file(check_path("data_path", data_path))
    out_dir = check_path("out_dir", out_dir)
    check_int("seed", seed)
    if max_frac is not None:
        check_range("max_frac", max_frac, 0.0, 1.0, hi_open=True)
        max_frac = float(max_frac)
    keep = _check_keep(keep)
    if not isinstance(save_images, bool):
        raise ValueError(f"save_images must be a bool, got {type(save_images).__name__}")
    if limit is not None:
        check_int("limit", limit, 0)
    records, summary = read_source(src, out_dir, limit)
    writer = JsonlWriter(out_dir)
    try:
        for rec, image in records_with_images(records, summary):
            box = mdpo_crop_box(rec.id, image.width, image.height, seed=seed, max_frac=max_frac, draw=0, keep=keep)
            removed = removed_fraction(box, image.width, image.height)
            info = {"crop_box": list(box), "kept": 1.0 - removed, "removed": removed, "seed": seed,
                    "keep": list(keep), "max_frac": max_frac}
            if save_images:
                rel = os.path.join("images", f"{safe_name(rec.id)}_crop.png")
                save_png(crop_image(image, box), os.path.join(out_dir, rel))
                info["crop_image"] = rel
            row = record_row(rec, out_dir, drop_extra=("mdpo",))
            row["mdpo"] = info
            writer.write(row)
            summary.written += 1
    except BaseException:
        writer.abort()
        raise
    writer.close()
    write_meta(out_dir, "mdpo", {"seed": seed, "keep": list(keep), "max_frac": max_frac, "save_images": save_images,
                                 "source": os.path.abspath(src)}, summary)
    return summary
