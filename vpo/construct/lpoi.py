"""LPOI's image lists (docs/methods.md, LPOI; paper 004): progressively masked copies of an image, and the dataset
writer.

Given an image and the critical object's box, :func:`build_lpoi_list` returns ``L`` images ranked from most to least
positive: ``x_1`` is the original; ``x_k`` (k >= 2) masks ``(k-1)/(L-1)`` of the box, growing from the box side
nearest the image edge, and carries a visual prompt (a red ellipse around the box). ``x_L`` masks the whole box (the
hard negative). The geometry, exactly:

- **Box.** ``(x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` exclusive (the shapes world's convention): the box covers
  columns ``x0 .. x1-1`` and rows ``y0 .. y1-1``. Fractional boxes are snapped outward (``floor`` the start, ``ceil``
  the end) and clipped to the image; a box with no pixel inside the image is a ``ValueError``.
- **Nearest side.** The gap between each side of the box and the image border on the same side:
  ``left = x0``, ``right = W - x1``, ``top = y0``, ``bottom = H - y1``. The mask grows from the side with the smallest
  gap; ties go to the first in the order ``left, right, top, bottom`` (:data:`SIDES`).
- **Fill order.** The ``A = w * h`` box pixels are ordered by distance from that side (column by column from the
  left or right side, row by row from the top or bottom side), and within one column top to bottom (within one row
  left to right). ``x_k`` masks the first ``n_k`` pixels of that order, with ``n_k`` = ``(k-1) A / (L-1)`` rounded
  half up = ``((k-1) * 2A + (L-1)) // (2 (L-1))``. So the masks are nested, the count is exact (a partial column is
  filled from the top), ``n_1 = 0`` and ``n_L = A``.
- **Visual prompt.** On every negative (``k >= 2``): an axis-aligned ellipse outline of ``ellipse_width`` px in
  ``ellipse_color`` (default pure red, ``(255, 0, 0)``), centred on the box, whose inner edge passes through the
  points 1 px outside the box corners (semi-axes ``sqrt(2) (w/2 + 1)`` and ``sqrt(2) (h/2 + 1)``, so the box lies
  inside it). It never paints a box pixel (the box is restored after drawing), so the masked-pixel count stays exact;
  parts outside the image are clipped. ``ellipse_width=0`` draws none (the paper's "masking only" ablation).
- **Mask fill.** ``mask_fill``, default black ``(0, 0, 0)``: the paper does not state the fill; a flat color keeps
  the count checkable.

Detection and verification. The writer needs a box per record: the record's ``bbox`` first (the shapes world writes
the box of the object its rejected caption is wrong about), then the boxes a :class:`Detector` finds for the object
names of the chosen answer (the paper takes, in order, objects of the first sentence of the chosen answer, of the
query, then the rest). Each candidate's list is checked by an optional verification hook
``verify(x_L, box, object_name, record=row) -> bool`` (the paper asks a VLM whether the fully masked image still
yields the chosen answer); the first candidate that passes is written, a record with none is skipped
(``no_box`` / ``unverified``). :class:`DetectorVerifier` is the built-in hook: the fully masked image must no
longer show the object to the detector. Built-in detectors: :class:`GroundTruthDetector` (the shapes world's exact
boxes, reported only while the object is still visible in the given image) and :class:`ZeroShotDetector` (a
transformers zero-shot detector, OWL-ViT / OWLv2 / Grounding DINO, from a local folder). They live in
:mod:`vpo.construct.lpoi_detectors` (re-exported here).

Example:
    >>> from PIL import Image
    >>> img = Image.new("RGB", (64, 48), (255, 255, 255))
    >>> xs = build_lpoi_list(img, (40, 10, 60, 30), L=5)       # 4 px from the right edge: grows from the right
    >>> len(xs), lpoi_mask_side((64, 48), (40, 10, 60, 30))
    (5, 'right')
    >>> [int(m.sum()) for m in lpoi_masks((64, 48), (40, 10, 60, 30), L=5)[1]]
    [0, 100, 200, 300, 400]
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from vpo.construct._io import (
    read_source,
    records_with_images,
    ConstructionSummary,
    JsonlWriter,
    check_int,
    check_path,
    check_rgb,
    data_file,
    record_row,
    safe_name,
    save_png,
    skip,
    write_meta,
)
from vpo.construct.lpoi_detectors import (  # noqa: F401
    Detection,
    Detector,
    DetectorVerifier,
    GroundTruthDetector,
    Verifier,
    ZeroShotDetector,
    box_iou,
)

SIDES = ("left", "right", "top", "bottom")  # also the tie-break order of the nearest side
RED = (255, 0, 0)
BLACK = (0, 0, 0)

Box = Tuple[int, int, int, int]


# ------------------------------------------------------------------------------------------------------ geometry
def snap_box(box, size: Tuple[int, int], name: str = "box") -> Box:
    """``box`` as integer pixels ``(x0, y0, x1, y1)`` (end-exclusive), snapped outward and clipped to ``size = (W, H)``.

    Raises:
        ValueError: ``box`` is not 4 finite numbers with ``x0 < x1`` and ``y0 < y1``, or lies outside the image.
    """
    ok = isinstance(box, (tuple, list)) and len(box) == 4
    ok = ok and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in box)
    ok = ok and all(math.isfinite(float(v)) for v in box)
    if not ok or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"{name} must be (x0, y0, x1, y1) finite numbers with x0 < x1 and y0 < y1, got {box!r}")
    W, H = size
    x0, y0 = max(0, math.floor(float(box[0]))), max(0, math.floor(float(box[1])))
    x1, y1 = min(W, math.ceil(float(box[2]))), min(H, math.ceil(float(box[3])))
    if x0 >= x1 or y0 >= y1:
        raise ValueError(f"{name} {tuple(box)} has no pixel inside the {W}x{H} image")
    return x0, y0, x1, y1


def lpoi_mask_side(size: Tuple[int, int], box) -> str:
    """The box side the mask grows from: the one with the smallest gap to the image border on its side
    (``left = x0``, ``right = W - x1``, ``top = y0``, ``bottom = H - y1``); ties in the order of :data:`SIDES`."""
    x0, y0, x1, y1 = snap_box(box, size)
    W, H = size
    gaps = {"left": x0, "right": W - x1, "top": y0, "bottom": H - y1}
    return min(SIDES, key=lambda s: (gaps[s], SIDES.index(s)))


def masked_count(k: int, L: int, area: int) -> int:
    """``n_k`` = ``(k-1) * area / (L-1)`` rounded half up (exact integer arithmetic), for ``1 <= k <= L``."""
    return ((k - 1) * 2 * area + (L - 1)) // (2 * (L - 1))


def lpoi_masks(size: Tuple[int, int], box, L: int = 5) -> Tuple[str, List[np.ndarray]]:
    """The ``L`` boolean masks ``[H, W]`` of the list (``masks[k-1]`` for ``x_k``) and the side they grow from.

    Args:
        size: ``(W, H)`` of the image (PIL's ``image.size``).
        box: ``(x0, y0, x1, y1)`` pixels, end-exclusive (module docstring).
        L: the list size, >= 2.

    Returns:
        ``(side, masks)``: ``masks[k-1].sum() == masked_count(k, L, w*h)``, nested, inside the box.
    """
    L = check_int("L", L, 2)
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"size must be (width, height) positive ints, got {size!r}")
    W, H = size
    x0, y0, x1, y1 = snap_box(box, size)
    side = lpoi_mask_side(size, (x0, y0, x1, y1))
    w, h = x1 - x0, y1 - y0
    # Fill order as (row, col) pairs: columns (or rows) from the growing side, then top->bottom (left->right).
    if side in ("left", "right"):
        cols = range(x0, x1) if side == "left" else range(x1 - 1, x0 - 1, -1)
        order_r = np.tile(np.arange(y0, y1), w)                      # [w*h]: rows cycle within each column
        order_c = np.repeat(np.fromiter(cols, dtype=np.int64), h)    # [w*h]
    else:
        rows = range(y0, y1) if side == "top" else range(y1 - 1, y0 - 1, -1)
        order_r = np.repeat(np.fromiter(rows, dtype=np.int64), w)
        order_c = np.tile(np.arange(x0, x1), h)
    masks = []
    for k in range(1, L + 1):
        n = masked_count(k, L, w * h)
        m = np.zeros((H, W), dtype=bool)
        m[order_r[:n], order_c[:n]] = True
        masks.append(m)
    return side, masks


def _ellipse_bounds(box: Box, width: int) -> Tuple[float, float, float, float]:
    """PIL bounding box of the outline whose inner edge passes 1 px outside the box corners (module docstring)."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0  # continuous coordinates: pixel i spans [i, i + 1)
    a = math.sqrt(2.0) * ((x1 - x0) / 2.0 + 1.0) + width
    b = math.sqrt(2.0) * ((y1 - y0) / 2.0 + 1.0) + width
    # PIL's ellipse box is inclusive pixel coordinates and the outline is drawn inward from it.
    return cx - a, cy - b, cx + a - 1.0, cy + b - 1.0


def build_lpoi_list(
    image,
    box,
    *,
    L: int = 5,
    ellipse_color: Tuple[int, int, int] = RED,
    ellipse_width: int = 2,
    mask_fill: Tuple[int, int, int] = BLACK,
) -> List[Any]:
    """LPOI's list ``[x_1, ..., x_L]`` of RGB ``PIL.Image`` s (module docstring for the exact geometry).

    Args:
        image: a ``PIL.Image`` (converted to RGB).
        box: the critical object's ``(x0, y0, x1, y1)`` in pixels, end-exclusive.
        L: the list size (5 in the paper), >= 2.
        ellipse_color: RGB of the visual prompt on the negatives.
        ellipse_width: outline width in pixels; 0 = no visual prompt.
        mask_fill: RGB the masked pixels are set to.

    Returns:
        ``L`` images of ``image``'s size: ``x_1`` a copy of the original, ``x_k`` with ``(k-1)/(L-1)`` of the box
        masked (rounded half up to whole pixels) and the ellipse.
    """
    from PIL import Image, ImageDraw

    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image, got {type(image).__name__}")
    ellipse_color = check_rgb("ellipse_color", ellipse_color)
    mask_fill = check_rgb("mask_fill", mask_fill)
    ellipse_width = check_int("ellipse_width", ellipse_width, 0)
    rgb = image.convert("RGB")
    snapped = snap_box(box, rgb.size)
    _, masks = lpoi_masks(rgb.size, snapped, L)
    base = np.asarray(rgb, dtype=np.uint8)
    x0, y0, x1, y1 = snapped
    out = [rgb.copy()]
    for m in masks[1:]:
        arr = base.copy()
        arr[m] = mask_fill
        img = Image.fromarray(arr)
        if ellipse_width > 0:
            ImageDraw.Draw(img).ellipse(_ellipse_bounds(snapped, ellipse_width), outline=ellipse_color,
                                        width=ellipse_width)
            drawn = np.asarray(img, dtype=np.uint8).copy()
            drawn[y0:y1, x0:x1] = arr[y0:y1, x0:x1]  # the prompt never covers the box
            img = Image.fromarray(drawn)
        out.append(img)
    return out


# ------------------------------------------------------------------------------------------------------ dataset
def shapes_object_names(row: Mapping) -> List[str]:
    """Object names to detect for a shapes-world row: the ``"color shape"`` mentions of its chosen answer, in order
    (duplicates removed). The default ``labels_fn`` of :func:`write_lpoi_dataset`."""
    from vpo.worlds import shapes

    names: List[str] = []
    for m in shapes.parse_description(str(row.get("chosen", ""))):
        name = f"{m.color} {m.shape}" if m.color else m.shape
        if name not in names:
            names.append(name)
    return names


def _box_name(rec, box: Box) -> Optional[str]:
    """The name of the object at ``box`` when the record knows it: a shapes-world object with that bbox, or the
    record's ``object`` / ``object_name`` field."""
    objs = rec.extra.get("objects")
    if isinstance(objs, list):
        for o in objs:
            if isinstance(o, Mapping) and list(o.get("bbox", ())) == list(box) and "shape" in o:
                return f"{o['color']} {o['shape']}" if o.get("color") else str(o["shape"])
    for key in ("object", "object_name"):
        if isinstance(rec.extra.get(key), str):
            return rec.extra[key]
    return None


@dataclass(frozen=True)
class LPOIConfig:
    """Options of :func:`write_lpoi_dataset` (see :func:`build_lpoi_list`)."""

    L: int = 5
    ellipse_color: Tuple[int, int, int] = RED
    ellipse_width: int = 2
    mask_fill: Tuple[int, int, int] = BLACK
    max_candidates: int = 3  # boxes tried per record (the record's bbox, then detections) before giving up

    def __post_init__(self):
        check_int("L", self.L, 2)
        check_rgb("ellipse_color", self.ellipse_color)
        check_int("ellipse_width", self.ellipse_width, 0)
        check_rgb("mask_fill", self.mask_fill)
        check_int("max_candidates", self.max_candidates, 1)


def write_lpoi_dataset(
    data_path: str,
    out_dir: str,
    *,
    config: LPOIConfig = LPOIConfig(),
    detector: Optional[Detector] = None,
    verify: Optional[Verifier] = None,
    labels_fn: Callable[[Mapping], Sequence[str]] = shapes_object_names,
    use_record_bbox: bool = True,
    limit: Optional[int] = None,
) -> ConstructionSummary:
    """Write LPOI's lists for a preference dataset.

    For each record (a ``.jsonl`` file or a folder with ``train.jsonl``, any layout :mod:`vpo.data` reads), the
    candidate boxes are tried in order — the record's ``bbox`` (when ``use_record_bbox``), then ``detector``'s
    detections of ``labels_fn(row)`` (label order, then score), at most ``config.max_candidates`` — and the first whose
    list passes ``verify`` is written: ``x_2 .. x_L`` as ``out_dir/images/{id}_x{k}.png`` and one ``"vpo"``-layout
    row with ``image_list`` = those ``L - 1`` paths (the collator prepends the record's image as ``x_1``), ``bbox`` =
    the box used (snapped to pixels) and ``lpoi`` = ``{"L", "side", "object", "masked_pixels"}``. Records with no
    candidate are skipped as ``no_box``, those whose every candidate fails ``verify`` as ``unverified``.

    Args:
        data_path: the source preference data.
        out_dir: the output folder (``train.jsonl``, ``images/``, ``construct.json``).
        config: list geometry (:class:`LPOIConfig`).
        detector: a :class:`Detector` for records without a ``bbox`` (or whose box fails verification).
        verify: ``verify(x_L, box, object_name, record=row) -> bool``, e.g. :class:`DetectorVerifier`; None keeps
            every list.
        labels_fn: the object names to detect for a row (default: the chosen answer's shapes-world mentions).
        use_record_bbox: try the record's ``bbox`` first.
        limit: use only the first ``limit`` readable records.

    Returns:
        A :class:`~vpo.construct.ConstructionSummary`.
    """

    if not isinstance(config, LPOIConfig):
        raise ValueError(f"config must be an LPOIConfig, got {type(config).__name__}")
    src = data_file(check_path("data_path", data_path))
    out_dir = check_path("out_dir", out_dir)
    if detector is not None and not callable(detector):
        raise ValueError(f"detector must be a Detector (callable), got {type(detector).__name__}")
    if verify is not None and not callable(verify):
        raise ValueError(f"verify must be callable, got {type(verify).__name__}")
    if limit is not None:
        check_int("limit", limit, 0)
    records, summary = read_source(src, out_dir, limit)
    writer = JsonlWriter(out_dir)
    try:
        for rec, image in records_with_images(records, summary):
            row = {"id": rec.id, "prompt": rec.prompt, "chosen": rec.chosen, "rejected": rec.rejected, **rec.extra}
            candidates: List[Tuple[Box, Optional[str]]] = []
            if use_record_bbox and rec.bbox is not None:
                try:
                    b = snap_box(rec.bbox, image.size, "bbox")
                    candidates.append((b, _box_name(rec, b)))
                except ValueError as e:
                    skip(summary, rec.id, "bad_bbox", str(e))
                    continue
            if detector is not None and len(candidates) < config.max_candidates:
                labels = list(labels_fn(row))
                dets = detector(image, labels, record=row) if labels else []
                rank = {name: j for j, name in enumerate(labels)}
                dets = sorted(dets, key=lambda d: (rank.get(d.label, len(rank)), -d.score))
                for d in dets:
                    try:
                        b = snap_box(d.box, image.size)
                    except ValueError:
                        continue
                    if all(box_iou(b, c) < 0.9 for c, _ in candidates):
                        candidates.append((b, d.label))
            candidates = candidates[: config.max_candidates]
            if not candidates:
                skip(summary, rec.id, "no_box", "no bbox in the record and no detection")
                continue
            chosen_list = None
            for box, name in candidates:
                images = build_lpoi_list(image, box, L=config.L, ellipse_color=config.ellipse_color,
                                         ellipse_width=config.ellipse_width, mask_fill=config.mask_fill)
                if verify is None or verify(images[-1], box, name, record=row):
                    chosen_list = (box, name, images)
                    break
            if chosen_list is None:
                skip(summary, rec.id, "unverified", f"the fully masked image still shows the object for each of "
                                                    f"{len(candidates)} candidate box(es)")
                continue
            box, name, images = chosen_list
            stem = safe_name(rec.id)
            paths = []
            for k, img in enumerate(images[1:], start=2):
                rel = os.path.join("images", f"{stem}_x{k}.png")
                save_png(img, os.path.join(out_dir, rel))
                paths.append(rel)
            out = record_row(rec, out_dir, drop_extra=("lpoi",))
            out["image_list"] = paths
            out["bbox"] = list(box)
            area = (box[2] - box[0]) * (box[3] - box[1])
            out["lpoi"] = {"L": config.L, "side": lpoi_mask_side(image.size, box), "object": name,
                           "masked_pixels": [masked_count(k, config.L, area) for k in range(1, config.L + 1)]}
            writer.write(out)
            summary.written += 1
    except BaseException:
        writer.abort()
        raise
    writer.close()
    cfg = asdict(config)
    cfg.update(detector=type(detector).__name__ if detector is not None else None,
               verify=type(verify).__name__ if verify is not None else None, use_record_bbox=use_record_bbox,
               source=os.path.abspath(src))
    write_meta(out_dir, "lpoi", cfg, summary)
    return summary
