"""CSR's image-relevance scorers ``R_I``: the shapes world's ground truth, and CLIP from a local folder."""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import torch

from vpo._validate import check_choice
from vpo.construct._io import load_local_pretrained
from vpo.construct.csr_search import ImageTextScorer

SCORERS = ("shapes", "clip")


class ShapesWorldScorer:
    """``R_I`` from the shapes world's ground truth (``record["objects"]``), exact and in ``[0, 100]``.

    The text's object mentions (:func:`vpo.worlds.shapes.parse_description`) are checked against the scene: a mention
    is correct when the scene has its shape, its color if it names one, and its count if it gives one (a count is
    compared with the number of objects of that (color, shape), or of that shape when no color is named).

    - ``metric="precision"`` (default): ``R_I = 100 · correct mentions / mentions`` — the share of the text's claims
      that are true;
    - ``metric="f1"``: the F1 of that precision and the recall of the scene's (color, shape) kinds that correct
      mentions cover.

    A text without any mention scores 0 (it carries no visual evidence). The image is not read.
    """

    METRICS = ("precision", "f1")

    def __init__(self, metric: str = "precision"):
        check_choice("metric", metric, self.METRICS)
        self.metric = metric

    def __call__(self, image, texts: Sequence[str], *, record: Optional[Mapping] = None) -> List[float]:
        from collections import Counter

        from vpo.worlds import shapes

        if not isinstance(record, Mapping) or not isinstance(record.get("objects"), list):
            raise ValueError("ShapesWorldScorer needs record= a shapes-world row with an 'objects' list, as the "
                             "vpo.worlds.shapes dataset writers produce")
        kinds = Counter((o["color"], o["shape"]) for o in record["objects"])
        by_shape = Counter(o["shape"] for o in record["objects"])
        out = []
        for text in texts:
            mentions = shapes.parse_description(str(text))
            if not mentions:
                out.append(0.0)
                continue
            covered = set()
            correct = 0
            for m in mentions:
                truth = kinds[(m.color, m.shape)] if m.color is not None else by_shape[m.shape]
                if truth > 0 and (m.count is None or m.count == truth):
                    correct += 1
                    covered.update([(m.color, m.shape)] if m.color is not None else
                                   [k for k in kinds if k[1] == m.shape])
            precision = correct / len(mentions)
            if self.metric == "precision":
                out.append(100.0 * precision)
            else:
                recall = len(covered) / len(kinds) if kinds else 0.0
                f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
                out.append(100.0 * f1)
        return out


class CLIPScorer:
    """``R_I(s) = max(100 · cos(F_I(v), F_T(s)), 0)`` with a transformers ``CLIPModel`` from a LOCAL folder.

    ``transformers`` is imported on construction; the folder must hold the model and its processor
    (``local_files_only=True``: nothing is downloaded). Texts longer than the text encoder's limit are truncated.

    Args:
        model_path: the local folder (e.g. a saved ``openai/clip-vit-large-patch14-336``).
        device: where to run it.
        model, processor: already-loaded objects instead of ``model_path``.
    """

    def __init__(self, model_path: Optional[str] = None, *, device: str = "cpu", model=None, processor=None):
        if model is None or processor is None:
            model, processor = load_local_pretrained(
                model_path, "CLIPModel", "a CLIP model and its processor (or use ShapesWorldScorer on the shapes world)",
                device)
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device

    def __call__(self, image, texts: Sequence[str], *, record: Optional[Mapping] = None) -> List[float]:
        texts = [str(t) for t in texts]
        if not texts:
            return []
        inputs = self.processor(text=texts, images=image.convert("RGB"), return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # [1, d]
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # [n, d]
        cos = (txt @ img[0]).tolist()                                          # [n]
        return [max(100.0 * c, 0.0) for c in cos]


def make_scorer(name: str = "shapes", *, clip_path: Optional[str] = None, device: str = "cpu") -> ImageTextScorer:
    """A built-in scorer by name: ``"shapes"`` (:class:`ShapesWorldScorer`) or ``"clip"`` (:class:`CLIPScorer` from
    ``clip_path``)."""
    check_choice("scorer", name, SCORERS)
    if name == "shapes":
        return ShapesWorldScorer()
    return CLIPScorer(clip_path, device=device)
