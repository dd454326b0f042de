"""mDPO's crops (SPEC.md, mDPO): a random crop removing 0-20% of the image, one crop shared by policy and reference.

The crop itself is the collator's (:func:`vpo.data.collator.crop_box`): a box keeping ``1 - f`` of the area,
``f ~ U(0, max_frac)``, the aspect ratio kept, the sides rounded UP (so at most ``f`` is removed), at a uniform
position, drawn from ``(seed, record id, draw)``. :func:`mdpo_crop_box` calls that very code, so a crop recorded here
is the crop the collator draws for the same ``(seed, id, draw)``; the collator then resizes the crop back to the
image's size, and the trainer runs the policy and the reference on that one sub-batch (SPEC's **[choice]**: one crop
for both; the mDPO code draws two).

:func:`write_mdpo_dataset` records, per example, the crop of ``draw = 0`` (one fixed crop per example) in the row:
``mdpo = {"crop_box": [l, t, r, b], "removed": fraction of the area, "seed", "max_frac", "crop_image"?}``, and with
``save_images=True`` the cropped-and-resized image (``out_dir/images/{id}_crop.png``) that the collator's ``crop``
pass encodes. The collator (``method="mdpo"``) uses a row's recorded ``mdpo.crop_box`` on every call, so training
on this dataset sees exactly the recorded crop every epoch (what ``ref_mode: precomputed`` needs); without a
recorded box it draws its own crop per call (``draw`` = its call counter), or draw 0's every call with
``fixed_noise`` — the crop recorded here for the same ``seed``.

Example:
    >>> box = mdpo_crop_box("rec-0", 64, 64, seed=0)
    >>> l, t, r, b = box
    >>> 0.0 <= 1 - (r - l) * (b - t) / (64 * 64) <= 0.2
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


def mdpo_crop_box(record_id: str, width: int, height: int, *, seed: int = 0, max_frac: float = 0.2,
                  draw: int = 0) -> Tuple[int, int, int, int]:
    """mDPO's crop of ``record_id`` in a ``width x height`` image: ``(left, top, right, bottom)`` pixels, end-exclusive,
    removing a fraction of the area in ``[0, max_frac]``; deterministic in ``(seed, record_id, draw)`` and equal to
    ``PreferenceCollator(..., seed=seed, crop_max_frac=max_frac).crop_box(record_id, width, height, draw)``
    (:func:`vpo.data.collator.crop_box`, with the arguments checked)."""
    from vpo._validate import check_range
    from vpo.data.collator import crop_box

    if not isinstance(record_id, str) or not record_id:
        raise ValueError(f"record_id must be a non-empty string, got {record_id!r}")
    check_int("width", width, 1)
    check_int("height", height, 1)
    check_int("seed", seed)
    check_int("draw", draw, 0)
    check_range("max_frac", max_frac, 0.0, 1.0, hi_open=True)
    return tuple(int(v) for v in crop_box(record_id, width, height, seed=seed, max_frac=float(max_frac), draw=draw))


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
    max_frac: float = 0.2,
    save_images: bool = False,
    limit: Optional[int] = None,
) -> ConstructionSummary:
    """Copy a preference dataset to ``out_dir`` with each example's mDPO crop recorded (module docstring).

    Args:
        data_path: a ``.jsonl`` file or a folder with ``train.jsonl`` (any layout :mod:`vpo.data` reads).
        out_dir: the output folder (``train.jsonl``, ``construct.json``, ``images/`` when ``save_images``).
        seed: the crop seed (use the collator's ``seed`` so the collator's first-call crops equal these).
        max_frac: the largest removed fraction of the area, in [0, 1) (0.2 = the paper's).
        save_images: also save the cropped-and-resized images and record their paths (``mdpo.crop_image``).
        limit: use only the first ``limit`` readable records.

    Returns:
        A :class:`~vpo.construct.ConstructionSummary`; unreadable images are skipped as ``unreadable_image``.
    """
    from vpo._validate import check_range

    src = data_file(check_path("data_path", data_path))
    out_dir = check_path("out_dir", out_dir)
    check_int("seed", seed)
    check_range("max_frac", max_frac, 0.0, 1.0, hi_open=True)
    if not isinstance(save_images, bool):
        raise ValueError(f"save_images must be a bool, got {type(save_images).__name__}")
    if limit is not None:
        check_int("limit", limit, 0)
    records, summary = read_source(src, out_dir, limit)
    writer = JsonlWriter(out_dir)
    try:
        for rec, image in records_with_images(records, summary):
            box = mdpo_crop_box(rec.id, image.width, image.height, seed=seed, max_frac=max_frac, draw=0)
            info = {"crop_box": list(box), "removed": removed_fraction(box, image.width, image.height),
                    "seed": seed, "max_frac": float(max_frac)}
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
    write_meta(out_dir, "mdpo", {"seed": seed, "max_frac": float(max_frac), "save_images": save_images,
                                 "source": os.path.abspath(src)}, summary)
    return summary
