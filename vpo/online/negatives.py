"""Negative-image generators for OViP: ``I⁻ = Diff(G_diff(Q, A⁺, A⁻))``, an image that shows what ``A⁻`` claims.

A generator is any object with ``generate(requests) -> list of PIL images`` (:class:`NegativeImageGenerator`); a
request (:class:`NegativeRequest`) carries the prompt, the chosen and the rejected response, the positive image, an
optional ``context`` (the source row or a :class:`~vpo.worlds.shapes.Scene`) and a seed. The paper (Sec. 2.2) asks an
LLM for a description ``T⁻`` of the negative response's content, then renders it with a diffusion model; any mapping
from ``(A⁺, A⁻)`` to a visually contradicting image fits.

Built-ins:

- :class:`ShapesNegativeGenerator`: the shapes world's exact renderer, :func:`vpo.worlds.shapes.render_description`
  of the rejected caption — with the source scene as ``base`` the minimal edit of the positive image (recolor / add /
  remove objects; the rest of the picture, clutter included, kept), else a fresh layout.
- :class:`DiffusersNegativeGenerator`: a ``diffusers`` text-to-image pipeline loaded from a LOCAL model folder
  (nothing is downloaded); ``diffusers`` is imported lazily and its absence is a clear ``ImportError``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Protocol, Sequence, runtime_checkable

from vpo._validate import check_choice, check_positive


@dataclass(frozen=True)
class NegativeRequest:
    """What a negative image is generated from.

    Attributes:
        prompt: the question ``Q``.
        chosen / rejected: ``A⁺`` and ``A⁻``.
        image: the positive image ``I⁺`` (a PIL image), or None.
        context: the source row (a mapping; the shapes world reads its ``"objects"`` / ``"scene"``), a
            :class:`~vpo.worlds.shapes.Scene`, or None.
        seed: seeds the generator's randomness for this image.
    """

    prompt: str
    chosen: str
    rejected: str
    image: Any = None
    context: Any = None
    seed: int = 0


@runtime_checkable
class NegativeImageGenerator(Protocol):
    """``generate(requests) -> [PIL.Image]``: one negative image per request, in order."""

    def generate(self, requests: Sequence[NegativeRequest]) -> List[Any]:
        ...


def scene_of(context: Any):
    """The :class:`~vpo.worlds.shapes.Scene` in ``context`` (a Scene, or a row with ``"objects"``), else None."""
    from vpo.worlds.shapes import Scene

    if isinstance(context, Scene):
        return context
    if isinstance(context, Mapping) and isinstance(context.get("objects"), (list, tuple)):
        return Scene.from_dict(context)
    return None


def _clutter_of(context: Any) -> bool:
    if isinstance(context, Mapping) and isinstance(context.get("scene"), Mapping):
        return bool(context["scene"].get("clutter", False))
    return False


class ShapesNegativeGenerator:
    """Render the scene the rejected response describes (:func:`vpo.worlds.shapes.render_description`).

    Args:
        mode: ``"auto"`` (default): the minimal edit of the source scene when the request's ``context`` holds one,
            else a fresh layout; ``"edit"``: always the edit (a request without a scene is a ``ValueError``);
            ``"random"``: always a fresh layout.
        clutter: draw background clutter; default (None): as the source row's ``scene.clutter``, else False.

    The caption rendered is the rejected response, except for an existence question (the prompt names one
    (color, shape), e.g. ``"is there a red circle in the image?"``) answered ``"yes"``/``"no"``: the negative is then
    the source scene with that object added (a wrong ``"yes"``) or removed (a wrong ``"no"``). The image size is the
    source scene's, else the positive image's width, else the world's default. ``np.random.default_rng(seed)`` draws
    the layout, so a request renders the same image every time.
    """

    def __init__(self, *, mode: str = "auto", clutter: Optional[bool] = None):
        check_choice("mode", mode, ("auto", "edit", "random"))
        if clutter is not None and not isinstance(clutter, bool):
            raise ValueError(f"clutter must be a bool or None, got {type(clutter).__name__}")
        self.mode = mode
        self.clutter = clutter

    def generate(self, requests: Sequence[NegativeRequest]) -> List[Any]:
        return [self.generate_one(r) for r in _check_requests(requests)]

    def generate_one(self, request: NegativeRequest):
        import numpy as np

        from vpo.worlds import shapes

        base = scene_of(request.context) if self.mode != "random" else None
        if self.mode == "edit" and base is None:
            raise ValueError("mode='edit' needs the source scene in the request's context (a Scene, or a row with "
                             "'objects'); got none: use mode='auto' or 'random'")
        clutter = _clutter_of(request.context) if self.clutter is None else self.clutter
        size = base.image_size if base is not None else getattr(request.image, "width", None)
        text = self._caption(request, base)
        rng = np.random.default_rng(int(request.seed) & ((1 << 63) - 1))
        return shapes.render_description(text, rng, base=base, image_size=size, clutter=clutter)

    @staticmethod
    def _caption(request: NegativeRequest, base) -> str:
        from vpo.eval.metrics import parse_yes_no
        from vpo.worlds import shapes

        answer = parse_yes_no(request.rejected)
        asked = shapes.parse_description(request.prompt)
        if answer is None or len(asked) != 1 or asked[0].color is None:
            return request.rejected
        kind = (asked[0].color, asked[0].shape)
        objs = list(base.objects) if base is not None else []
        if answer == "yes":  # the response claims the object: show it
            objs.append(shapes.Obj(kind[1], kind[0], "large", "center", (0, 0, 1, 1)))
        else:  # the response denies it: take it away
            objs = [o for o in objs if o.kind != kind]
        return shapes.describe(shapes.Scene(tuple(objs)))


class DiffusersNegativeGenerator:
    """A ``diffusers`` text-to-image pipeline from a local folder, prompted with a description of ``A⁻``.

    Args:
        model_path: a LOCAL folder holding the pipeline (``model_index.json`` ...); loaded with
            ``AutoPipelineForText2Image.from_pretrained(model_path, local_files_only=True)`` on first use.
        device: where the pipeline runs (default: ``"cuda"`` when available, else ``"cpu"``).
        torch_dtype: e.g. ``torch.bfloat16`` (default: the pipeline's).
        num_inference_steps / guidance_scale / height / width: the paper's settings by default (40, 7.5, 384x384).
        description_fn: ``fn(request) -> str``, the text ``T⁻`` to render (the paper's ``G_diff``; e.g. an LLM call);
            default: the rejected response itself.
        match_size: resize each image to the positive image's size (the processor then sees the same resolution).
        pipeline_kwargs: more keyword arguments for every pipeline call (``negative_prompt``, ...).

    Raises:
        ValueError: ``model_path`` is not an existing local folder.
        ImportError: ``diffusers`` is not installed (``pip install diffusers``).
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: Optional[str] = None,
        torch_dtype: Any = None,
        num_inference_steps: int = 40,
        guidance_scale: float = 7.5,
        height: int = 384,
        width: int = 384,
        description_fn: Optional[Callable[[NegativeRequest], str]] = None,
        match_size: bool = True,
        pipeline_kwargs: Optional[Mapping[str, Any]] = None,
    ):
        if not isinstance(model_path, (str, os.PathLike)) or not os.path.isdir(model_path):
            raise ValueError(f"model_path must be an existing local folder holding a diffusers pipeline (nothing is "
                             f"downloaded), got {model_path!r}")
        for name, value in (("num_inference_steps", num_inference_steps), ("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_positive("guidance_scale", guidance_scale, allow_zero=True)
        if description_fn is not None and not callable(description_fn):
            raise ValueError(f"description_fn must be callable, got {type(description_fn).__name__}")
        self._diffusers = _import_diffusers()
        self.model_path = os.fspath(model_path)
        self.device = device
        self.torch_dtype = torch_dtype
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.height, self.width = height, width
        self.description_fn = description_fn
        self.match_size = bool(match_size)
        self.pipeline_kwargs = dict(pipeline_kwargs or {})
        self._pipe = None

    @property
    def pipeline(self):
        """The loaded pipeline (loaded on first access)."""
        if self._pipe is None:
            import torch

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            kwargs = {"local_files_only": True}
            if self.torch_dtype is not None:
                kwargs["torch_dtype"] = self.torch_dtype
            pipe = self._diffusers.AutoPipelineForText2Image.from_pretrained(self.model_path, **kwargs)
            if hasattr(pipe, "set_progress_bar_config"):
                pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe.to(device)
            self.device = device
        return self._pipe

    def describe(self, request: NegativeRequest) -> str:
        """``T⁻``: ``description_fn(request)``, or the rejected response."""
        text = self.description_fn(request) if self.description_fn is not None else request.rejected
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"the negative-image description must be a non-empty string, got {text!r}")
        return text

    def generate(self, requests: Sequence[NegativeRequest]) -> List[Any]:
        import torch

        requests = _check_requests(requests)
        if not requests:
            return []
        pipe = self.pipeline
        gens = [torch.Generator(device=self.device).manual_seed(int(r.seed) & ((1 << 63) - 1)) for r in requests]
        out = pipe(prompt=[self.describe(r) for r in requests], num_inference_steps=self.num_inference_steps,
                   guidance_scale=self.guidance_scale, height=self.height, width=self.width, generator=gens,
                   **self.pipeline_kwargs)
        images = list(out.images)
        if self.match_size:
            images = [im.resize(r.image.size) if getattr(r.image, "size", None) else im
                      for im, r in zip(images, requests)]
        return images


def _import_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            "DiffusersNegativeGenerator needs the 'diffusers' package, which is not installed: `pip install "
            "diffusers` (and the pipeline's own dependencies), or use ShapesNegativeGenerator / your own "
            f"NegativeImageGenerator ({e})"
        ) from e
    return diffusers


def _check_requests(requests: Sequence[NegativeRequest]) -> List[NegativeRequest]:
    if isinstance(requests, NegativeRequest) or not isinstance(requests, Sequence):
        raise ValueError(f"requests must be a sequence of NegativeRequest, got {type(requests).__name__}")
    for i, r in enumerate(requests):
        if not isinstance(r, NegativeRequest):
            raise ValueError(f"requests[{i}] must be a NegativeRequest, got {type(r).__name__}")
    return list(requests)


NEGATIVE_GENERATORS = ("shapes", "diffusers")


def make_negative_generator(kind: str = "shapes", *, path: Optional[str] = None, **kwargs) -> NegativeImageGenerator:
    """A negative-image generator by name: ``"shapes"`` (:class:`ShapesNegativeGenerator`) or ``"diffusers"``
    (:class:`DiffusersNegativeGenerator` from the local folder ``path``; ``kwargs`` go to it). Used by ``vpo ovip``
    and the trainer's online OViP (``online_negatives``)."""
    check_choice("negatives", kind, NEGATIVE_GENERATORS)
    if kind == "shapes":
        return ShapesNegativeGenerator(**kwargs)
    if not path:
        raise ValueError("the diffusers negative generator needs path = a local diffusers pipeline folder")
    return DiffusersNegativeGenerator(path, **kwargs)
