"""LPOI's detectors and verification hook (:mod:`vpo.construct.lpoi`, "Detection and verification"): what finds the
critical object's box when a record has none, and what checks that the fully masked image no longer shows it.

- :class:`Detection`, :class:`Detector` (the protocol), ``Verifier`` (the hook's signature) and :func:`box_iou`;
- :class:`GroundTruthDetector`: the shapes world's exact boxes, reported only while the object is still visible;
- :class:`ZeroShotDetector`: a transformers zero-shot detector (OWL-ViT / OWLv2 / Grounding DINO) from a local folder;
- :class:`DetectorVerifier`: the built-in hook on a detector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np

from vpo.construct._io import load_local_pretrained

@dataclass(frozen=True)
class Detection:
    """One detected object: its ``label`` (one of the queried names), ``box`` ``(x0, y0, x1, y1)`` in pixels of the
    queried image, and ``score`` in [0, 1]."""

    label: str
    box: Tuple[float, float, float, float]
    score: float


@runtime_checkable
class Detector(Protocol):
    """Finds the named objects in an image: ``detector(image, labels, record=row) -> [Detection, ...]``.

    ``labels`` are object names (``"red circle"``); ``record`` is the source row (detectors that read ground truth
    use it; others ignore it)."""

    def __call__(self, image, labels: Sequence[str], *, record: Optional[Mapping] = None) -> List[Detection]: ...


Verifier = Callable[..., bool]  # verify(masked_image, box, object_name, record=row) -> bool (True = keep)


def box_iou(a, b) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class GroundTruthDetector:
    """The shapes world's exact detector: the scene's objects (``record["objects"]``) that match a label and are still
    visible in ``image``.

    A label matches an object when :func:`vpo.worlds.shapes.parse_description` reads it as the object's shape and,
    if it names one, its color (``"red circle"``, ``"circle"``, ``"circles"``). Visibility: objects are drawn without
    anti-aliasing in exact palette colors, so ``score`` = the object's palette-colored pixels inside its box in
    ``image`` / the same count in the clean render of the scene; an object under ``min_visible`` is not reported
    (which makes this detector see masks). ``image`` must have the scene's size.

    Args:
        min_visible: the visible fraction below which an object is not reported, in (0, 1].
    """

    def __init__(self, min_visible: float = 0.5):
        from vpo._validate import check_range

        check_range("min_visible", min_visible, 0.0, 1.0, lo_open=True)
        self.min_visible = float(min_visible)
        self._clean_cache: Dict[Any, np.ndarray] = {}

    def __call__(self, image, labels: Sequence[str], *, record: Optional[Mapping] = None) -> List[Detection]:
        from vpo.worlds import shapes

        scene = self._scene(record)
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            raise ValueError(f"labels must be a list of object names, got {type(labels).__name__}")
        arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
        if arr.shape[:2] != (scene.image_size, scene.image_size):
            raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]} but the scene is {scene.image_size}x"
                             f"{scene.image_size}: GroundTruthDetector needs the world's own image size")
        clean = self._clean(scene)
        out: List[Detection] = []
        for label in labels:
            wanted = shapes.parse_description(str(label))
            for o in scene.objects:
                if not any(m.shape == o.shape and m.color in (None, o.color) for m in wanted):
                    continue
                x0, y0, x1, y1 = o.bbox
                color = np.array(shapes.PALETTE[o.color], dtype=np.uint8)
                total = int((clean[y0:y1, x0:x1] == color).all(-1).sum())
                seen = int((arr[y0:y1, x0:x1] == color).all(-1).sum())
                score = seen / total if total else 0.0
                if score >= self.min_visible:
                    out.append(Detection(str(label), tuple(float(v) for v in o.bbox), score))
        return out

    @staticmethod
    def _scene(record):
        from vpo.worlds import shapes

        if not isinstance(record, Mapping) or "objects" not in record:
            raise ValueError("GroundTruthDetector needs record= a shapes-world row with 'objects' (and 'scene'), "
                             "as vpo.worlds.shapes.make_dataset writes")
        return shapes.Scene.from_dict(record)

    def _clean(self, scene) -> np.ndarray:
        from vpo.worlds import shapes

        key = (scene.objects, scene.image_size)
        if key not in self._clean_cache:
            if len(self._clean_cache) > 256:
                self._clean_cache.clear()
            self._clean_cache[key] = np.asarray(shapes.render(scene), dtype=np.uint8)
        return self._clean_cache[key]


class ZeroShotDetector:
    """A transformers zero-shot object detector (OWL-ViT, OWLv2, Grounding DINO) loaded from a LOCAL folder.

    ``transformers`` is imported on construction. The folder must hold the model and its processor
    (``AutoModelForZeroShotObjectDetection`` / ``AutoProcessor``, ``local_files_only=True``: nothing is downloaded).

    Args:
        model_path: the local folder.
        threshold: the box score threshold of the processor's post-processing.
        text_threshold: Grounding DINO's text threshold (ignored by OWL-ViT).
        device: where to run the model.
        model, processor: already-loaded objects instead of ``model_path``.
    """

    def __init__(self, model_path: Optional[str] = None, *, threshold: float = 0.1, text_threshold: float = 0.25,
                 device: str = "cpu", model=None, processor=None):
        if model is None or processor is None:
            model, processor = load_local_pretrained(
                model_path, "AutoModelForZeroShotObjectDetection",
                "a zero-shot detector (OWL-ViT, OWLv2 or Grounding DINO) and its processor", device)
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.threshold = float(threshold)
        self.text_threshold = float(text_threshold)

    def __call__(self, image, labels: Sequence[str], *, record: Optional[Mapping] = None) -> List[Detection]:
        import inspect

        import torch

        labels = [str(x) for x in labels]
        if not labels:
            return []
        image = image.convert("RGB")
        inputs = self.processor(text=[labels], images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        post = self.processor.post_process_grounded_object_detection
        kwargs = dict(threshold=self.threshold, target_sizes=[(image.height, image.width)], text_labels=[labels])
        params = inspect.signature(post).parameters
        if "input_ids" in params:  # Grounding DINO
            kwargs.update(input_ids=inputs["input_ids"], text_threshold=self.text_threshold)
        res = post(outputs, **kwargs)[0]
        names = res.get("text_labels")
        if names is None:
            names = [labels[int(i)] for i in res["labels"]]
        return [Detection(str(n), tuple(float(v) for v in b.tolist()), float(s))
                for n, b, s in zip(names, res["boxes"], res["scores"])]


class DetectorVerifier:
    """The built-in verification hook: keep a list only if the fully masked image ``x_L`` no longer shows the object
    to ``detector`` — no detection of ``object_name`` whose box overlaps the masked box with IoU >= ``iou``.

    Call: ``verifier(masked_image, box, object_name, record=row) -> bool``. A candidate without a name cannot be
    checked and passes.
    """

    def __init__(self, detector: Detector, iou: float = 0.5):
        from vpo._validate import check_range

        if not callable(detector):
            raise ValueError(f"detector must be callable (a Detector), got {type(detector).__name__}")
        check_range("iou", iou, 0.0, 1.0, lo_open=True)
        self.detector = detector
        self.iou = float(iou)

    def __call__(self, masked_image, box, object_name: Optional[str], *, record: Optional[Mapping] = None) -> bool:
        if not object_name:
            return True
        dets = self.detector(masked_image, [object_name], record=record)
        return not any(box_iou(d.box, box) >= self.iou for d in dets)
