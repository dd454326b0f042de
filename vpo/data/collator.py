"""The preference collator: records -> the model family's inputs for every pass a method needs.

:class:`PreferenceCollator` turns a list of :class:`~vpo.data.PreferenceRecord` into one batch dict (the contract is
pinned in ``docs/data_format.md``; the trainer consumes exactly it):

- ``input_ids``, ``attention_mask``, ``labels`` ``[2B, L]``: rows ``0..B-1`` = the chosen responses, ``B..2B-1`` = the
  rejected ones (Liger's convention); each row = the chat-templated prompt with the image, then the response.
  ``labels`` are UNSHIFTED (HF convention): ``labels[t] = input_ids[t]`` on the response tokens (the response's
  end-of-turn token included), ``-100`` elsewhere (prompt, image tokens, padding). Padding is on the RIGHT.
- the family's vision keys for those ``2B`` rows (each example's image serves its chosen and its rejected row).
- ``sub``: the extra passes of the method, each a complete model-input dict with its own ``labels``
  (``tpo``: ``noised``; ``mdpo``: ``crop``; ``ovip``: ``noimg``, ``negimg``; ``lpoi``: ``list``).
- ``token_weights`` (``catpo``), ``ref_logps`` (when every record carries them), ``ids``, ``skipped``.

How a row is tokenized: the prompt (``[{"type": "image"}, {"type": "text", "text": prompt}]`` as the user turn) is
rendered with the processor's chat template and ``add_generation_prompt=True`` and run through the processor with the
image (which expands the image placeholder to the model's image tokens); the response is the rest of the rendered
two-turn conversation (``full[len(prompt):]``, trailing whitespace stripped), tokenized in context (the tokens of
``prompt + response`` after those of ``prompt``, so BPE merges at the boundary are the conversation's); when
that does not end with a special token (a template without an end-of-turn) the tokenizer's eos is appended. Response
tokens are therefore exactly the labels. Special-token strings (and a literal ``<image>``) are removed from the
record's text first, so a prompt such as ``"<image>\\nWhat is this?"`` cannot inject a second image placeholder.

TPO noise (docs/methods.md, TPO step 1, pixel space): the decoded image as a ``[3, H, W]`` tensor in ``[0, 1]`` ->
:func:`vpo.add_diffusion_noise` (``step=noise_step``, clamped to ``[0, 1]``) with a ``torch.Generator`` seeded from
``(seed, record id)`` when ``fixed_noise`` (one ε per example for the whole run, so ``c_ref`` can be cached), else from
``(seed, record id, draw)`` (``draw`` = the collator's call counter: a fresh ε per call) -> rounded to 8 bits (the PIL
image the processor's resize needs; the PIL image processors round float images the same way) -> the processor's
resize and normalization.

mDPO crop: a box keeping a fraction ``a ~ U(crop_keep)`` of the area (default 1-20%, mDPO's
``RandomResizedCrop(scale=(0.01, 0.2))``; aspect ratio kept, the box sides rounded up so at least ``a`` is kept) —
or, with ``crop_max_frac`` set, the older box removing ``f ~ U(0, crop_max_frac)`` — at a uniform position, drawn from ``(seed, record id, draw)`` (:func:`crop_box`; draw 0
on every call when ``fixed_noise``), then resized back to the image's size (so the image-token count does not change).
A record carrying ``extra["mdpo"]["crop_box"]`` (written by ``vpo mdpo-crops``) uses that box on every call instead.
One crop per example and call: the trainer runs policy and reference on the same sub-batch.
"""
from __future__ import annotations

import math
import operator
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from vpo._validate import check_choice, check_range
from vpo.data.processors import FAMILIES
from vpo.data.records import (
    BAD_FIELD,
    BAD_IMAGE_LIST,
    BAD_TOKEN_WEIGHTS,
    MISSING_FIELD,
    NO_IMAGE_LIST,
    NO_NEG_IMAGE,
    TOO_LONG,
    UNREADABLE_IMAGE,
    DataStats,
    PreferenceRecord,
    SkipRecord,
    UnreadableImageError,
    load_image,
    record_from_row,
    warn_skip,
)
from vpo.data.augment import MDPO_CROP_KEEP, _bicubic, _to_pil, _to_unit_tensor, crop_box, derive_seed  # noqa: F401
from vpo.data.batching import (IGNORE_INDEX, MODEL_INPUT_KEYS, VISION_KEYS, BatchAssembly, _Example, _Row,  # noqa: F401
                               model_inputs)
from vpo.data.encoding import GENERIC, ChatEncoding
from vpo.noise import NUM_DIFFUSION_STEPS, add_diffusion_noise

METHODS = ("dpo", "csr", "tpo", "mdpo", "ovip", "lpoi", "catpo")
# family="generic": any processor (vision keys = whatever it returns). Token-type keys it returns are rebuilt per row
# from the image placeholder (1 on image tokens, 2 on video tokens).
COLLATOR_FAMILIES = FAMILIES + (GENERIC,)
# Methods whose passes take one image per example (the others accept several: record.image a list).
SINGLE_IMAGE_METHODS = ("ovip", "lpoi", "mdpo")


class PreferenceCollator(ChatEncoding, BatchAssembly):
    """Collate preference records into the batch contract of ``docs/data_format.md`` (``collate_fn`` of a loader).

    Args:
        processor: the model's processor (``LlavaProcessor``, ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``,
            ``Idefics2Processor``; a real checkpoint's or :func:`vpo.data.build_tiny_processor`'s) with a chat
            template.
        family: ``"llava"``, ``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"idefics2"`` (which vision keys to emit), or
            ``"generic"``: any image-text-to-text processor — the vision keys are whatever the processor returns
            (``pixel_values``, ``image_sizes``, ``pixel_attention_mask``, ...), and ``token_type_ids`` /
            ``mm_token_type_ids`` are rebuilt per row when the processor returns them (:mod:`vpo.data.generic`).
        method: ``"dpo"``, ``"csr"``, ``"tpo"``, ``"mdpo"``, ``"ovip"``, ``"lpoi"`` or ``"catpo"`` (which extra
            passes to build).
        max_length: truncate each row's response so the row fits (prompts are never cut; an example whose prompt
            leaves no room for one response token is skipped as ``too_long``). ``None``: no limit.
        noise_step: TPO's diffusion step ``k`` in ``[0, 999]`` (500 = the paper's).
        seed: seeds the TPO noise and the mDPO crops, together with each record's id.
        fixed_noise: TPO: one fixed ε per example for the whole run (else a fresh ε per call); mDPO: one fixed crop
            per example (draw 0's) for the whole run (else a fresh crop per call).
        crop_keep: mDPO: the crop keeps a fraction of the area drawn uniformly in ``crop_keep`` (default
            ``(0.01, 0.2)``, the mDPO code's).
        noise_clip: TPO: how the noised image is brought back to ``[0, 1]``: ``"clamp"`` (default) or ``"wrap"``
            (the official TPO code's uint8 wrap-around; :func:`vpo.add_diffusion_noise`).
        crop_max_frac: mDPO, the older crop: when set, it removes a fraction drawn uniformly in
            ``[0, crop_max_frac]`` instead (``crop_keep`` is then unused).
        list_size: LPOI: the list length ``L``.
        ovip_rejected: OViP: give ``noimg`` and ``negimg`` ``2B`` rows (the chosen rows, then the rejected rows: the
            symmetric image loss and the bi-anchor variant need them) instead of the ``B`` chosen rows.

    Call it on a list of records (or of ``"vpo"``-layout dicts). Records that cannot be used are skipped with a
    :class:`~vpo.data.DataWarning` and counted in ``batch["skipped"]`` and in :attr:`stats`; the rest of the batch
    survives. When every record of a call is skipped the result is ``{"ids": [], "skipped": {...}}`` (no tensors).

    Attributes:
        stats: a :class:`~vpo.data.DataStats` over all calls of this instance (per worker process with a
            multi-worker ``DataLoader``: use ``batch["skipped"]`` to aggregate).
        draw: the call counter that seeds the per-call randomness (TPO's ε unless ``fixed_noise``, mDPO's crops);
            set it to resume a run's random stream.

    Example:
        >>> from vpo.data import PreferenceCollator, PreferenceRecord, build_tiny_processor
        >>> from PIL import Image
        >>> proc = build_tiny_processor("llava")
        >>> rec = PreferenceRecord("r0", Image.new("RGB", (24, 24), "red"), "what color is the cat ?",
        ...                        "red .", "blue .")
        >>> batch = PreferenceCollator(proc, "llava", method="tpo")([rec])
        >>> tuple(batch["input_ids"].shape), tuple(batch["pixel_values"].shape), sorted(batch["sub"])
        ((2, 23), (2, 3, 24, 24), ['noised'])
        >>> proc.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
        'red . </s>'
    """

    def __init__(
        self,
        processor,
        family: str,
        *,
        method: str = "dpo",
        max_length: Optional[int] = None,
        noise_step: int = 500,
        seed: int = 0,
        fixed_noise: bool = False,
        crop_max_frac: Optional[float] = None,
        crop_keep: Tuple[float, float] = MDPO_CROP_KEEP,
        noise_clip: str = "clamp",
        list_size: int = 5,
        ovip_rejected: bool = False,
    ):
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or not callable(processor):
            raise ValueError(
                f"processor must be a transformers processor with a tokenizer, got {type(processor).__name__}"
            )
        if not getattr(processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
            raise ValueError("processor has no chat template: set processor.chat_template")
        check_choice("family", family, COLLATOR_FAMILIES)
        check_choice("method", method, METHODS)
        if max_length is not None:
            max_length = _check_int("max_length", max_length, 2, None)
        self.noise_step = _check_int("noise_step", noise_step, 0, NUM_DIFFUSION_STEPS - 1)
        self.seed = _check_int("seed", seed, None, None)
        if not isinstance(fixed_noise, bool):
            raise ValueError(f"fixed_noise must be a bool, got {type(fixed_noise).__name__}")
        if crop_max_frac is not None:
            check_range("crop_max_frac", crop_max_frac, 0.0, 1.0, hi_open=True)
        if not (isinstance(crop_keep, (tuple, list)) and len(crop_keep) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in crop_keep)
                and 0.0 < crop_keep[0] <= crop_keep[1] <= 1.0):
            raise ValueError(f"crop_keep must be (lo, hi) with 0 < lo <= hi <= 1 (the fraction of the area a crop "
                             f"keeps), got {crop_keep!r}")
        self.list_size = _check_int("list_size", list_size, 2, None)
        if not isinstance(ovip_rejected, bool):
            raise ValueError(f"ovip_rejected must be a bool, got {type(ovip_rejected).__name__}")
        self.ovip_rejected = ovip_rejected

        self.processor = processor
        self.tokenizer = tokenizer
        self.family = family
        self.method = method
        self.max_length = max_length
        self.fixed_noise = fixed_noise
        self.crop_max_frac = None if crop_max_frac is None else float(crop_max_frac)
        self.crop_keep = (float(crop_keep[0]), float(crop_keep[1]))
        if noise_clip not in ("clamp", "wrap"):
            raise ValueError(f"noise_clip must be 'clamp' or 'wrap' (TPO's noised image back in [0, 1]), got "
                             f"{noise_clip!r}")
        self.noise_clip = noise_clip
        self.draw = 0
        self.stats = DataStats()

        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        self.video_token_id = getattr(processor, "video_token_id", None)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self._special_ids = set(tokenizer.all_special_ids)
        if family == GENERIC:  # e.g. Gemma's <end_of_turn>: an added special token that ends the turn, no eos after it
            added = getattr(tokenizer, "added_tokens_decoder", None) or {}
            self._special_ids |= {i for i, t in added.items() if getattr(t, "special", False)}
        scrub = set(tokenizer.all_special_tokens) | {"<image>"}
        for attr in ("image_token", "video_token", "fake_image_token", "image_boundary_token"):
            tok = getattr(processor, attr, None)
            if isinstance(tok, str) and tok:
                scrub.add(tok)
        self._scrub = sorted((t for t in scrub if t), key=len, reverse=True)
        self._warned_template = False
        self._type_keys: set = set()  # family "generic": token-type keys the processor returns

    # ---------------------------------------------------------------------------------------------- public helpers
    def noise_seed(self, record_id: str, draw: Optional[int] = None) -> int:
        """The seed of the TPO ε of ``record_id`` at call ``draw`` (ignored when ``fixed_noise``)."""
        if self.fixed_noise:
            return derive_seed("vpo-tpo-noise", self.seed, str(record_id))
        return derive_seed("vpo-tpo-noise", self.seed, str(record_id), self.draw if draw is None else draw)

    def noised_pixels(self, image, record_id: str, draw: Optional[int] = None) -> torch.Tensor:
        """The TPO-noised image of ``record_id`` in pixel space: ``[3, H, W]`` float32 in ``[0, 1]`` (before the
        8-bit rounding and the processor)."""
        x = _to_unit_tensor(image)
        g = torch.Generator().manual_seed(self.noise_seed(record_id, draw))
        return add_diffusion_noise(x, self.noise_step, generator=g, clip=self.noise_clip)

    def crop_box(
        self, record_id: str, width: int, height: int, draw: Optional[int] = None
    ) -> Tuple[int, int, int, int]:
        """mDPO's crop of ``record_id`` at call ``draw``: ``(left, top, right, bottom)`` in pixels of a
        ``width x height`` image, keeping a fraction of the area in ``crop_keep`` (or removing one in
        ``[0, crop_max_frac]`` when that is set)
        (:func:`crop_box`). With ``fixed_noise`` the draw is ignored: every call uses the crop of draw 0 (the one
        ``vpo mdpo-crops`` records)."""
        draw = 0 if self.fixed_noise else (self.draw if draw is None else draw)
        return crop_box(record_id, width, height, seed=self.seed, max_frac=self.crop_max_frac, draw=draw,
                        keep=self.crop_keep)

    def example_crop_box(self, rec: PreferenceRecord, width: int, height: int, draw: int) -> Tuple[int, int, int, int]:
        """The crop the ``crop`` pass of ``rec`` uses: the record's ``extra["mdpo"]["crop_box"]`` when present (written
        by ``vpo mdpo-crops``; a box that does not fit the image skips the record as ``bad_field``), else
        :meth:`crop_box` at ``draw``."""
        info = rec.extra.get("mdpo")
        box = info.get("crop_box") if isinstance(info, Mapping) else None
        if box is None:
            return self.crop_box(rec.id, width, height, draw)
        ok = isinstance(box, (list, tuple)) and len(box) == 4
        ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in box)
        if not ok or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
            raise SkipRecord(BAD_FIELD, f"mdpo.crop_box must be [left, top, right, bottom] integer pixels inside the "
                                        f"{width}x{height} image, got {box!r}")
        return tuple(box)

    # --------------------------------------------------------------------------------------------------- the call
    def __call__(self, records: Sequence[Any]) -> Dict[str, Any]:
        if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
            raise ValueError(f"records must be a list of PreferenceRecord, got {type(records).__name__}")
        draw = self.draw
        self.draw += 1
        skipped: Counter = Counter()
        examples: List[_Example] = []
        for i, rec in enumerate(records):
            rid = getattr(rec, "id", None) if not isinstance(rec, Mapping) else rec.get("id", f"#{i}")
            try:
                rec = self._as_record(rec, i)
                rid = rec.id
                examples.append(self._prepare(rec, draw))
            except SkipRecord as e:
                skipped[e.reason] += 1
                warn_skip(rid, e.reason, e.message, stacklevel=2)
        self.stats.seen += len(records)
        self.stats.kept += len(examples)
        self.stats.skipped.update(skipped)
        if not examples:
            return {"ids": [], "skipped": dict(skipped)}
        return self._assemble(examples, dict(skipped))

    # ------------------------------------------------------------------------------------------------ preparation
    def _as_record(self, rec: Any, i: int) -> PreferenceRecord:
        if isinstance(rec, PreferenceRecord):
            return rec
        if isinstance(rec, Mapping):
            return record_from_row(rec, layout="auto", default_id=f"#{i}")
        raise ValueError(f"records must hold PreferenceRecord objects or dicts, got {type(rec).__name__} at index {i}")

    def _clean(self, text: Any, name: str) -> Any:
        if name == "prompt" and isinstance(text, (list, tuple)):  # a conversation (vpo.data.conversation)
            msgs = [{"role": m["role"], "content": [dict(p) for p in m["content"]]} for m in text]
            for m in msgs:
                for p in m["content"]:
                    if p["type"] == "text":
                        p["text"] = self._scrub_text(p["text"])
            if not any(p["type"] == "text" and p["text"].strip() for m in msgs for p in m["content"]):
                raise SkipRecord(MISSING_FIELD, "missing field 'prompt' (no text)")
            return msgs
        if text is None:
            raise SkipRecord(MISSING_FIELD, f"missing field {name!r}")
        if not isinstance(text, str):
            raise SkipRecord(BAD_FIELD, f"field {name!r} must be a string, got {type(text).__name__}")
        text = self._scrub_text(text).strip()
        if not text:
            raise SkipRecord(MISSING_FIELD, f"missing field {name!r} (empty)")
        return text

    def _scrub_text(self, text: str) -> str:
        """``text`` without special-token strings (so it cannot inject an image placeholder)."""
        for tok in self._scrub:
            text = text.replace(tok, " ")
        return text

    def _load(self, spec: Any, name: str):
        if spec is None or (isinstance(spec, str) and not spec.strip()):
            raise SkipRecord(MISSING_FIELD, f"missing field {name!r}")
        try:
            return load_image(spec)
        except UnreadableImageError as e:
            raise SkipRecord(UNREADABLE_IMAGE, f"{name}: {e}") from None

    def _prepare(self, rec: PreferenceRecord, draw: int) -> _Example:
        prompt = self._clean(rec.prompt, "prompt")
        chosen = self._clean(rec.chosen, "chosen")
        rejected = self._clean(rec.rejected, "rejected")
        specs = rec.image if isinstance(rec.image, (list, tuple)) else [rec.image]
        if not specs:
            raise SkipRecord(MISSING_FIELD, "missing field 'image'")
        images = [self._load(x, "image" if len(specs) == 1 else f"image[{k}]") for k, x in enumerate(specs)]
        image = images[0]
        method = self.method
        if len(images) > 1 and method in SINGLE_IMAGE_METHODS:
            raise SkipRecord(BAD_FIELD, f"method {method!r} takes one image per example, the record has {len(images)}")
        # Everything that can skip the record is checked before any tokenization work.
        neg = list_images = None
        if method == "ovip":
            if rec.neg_image is None:
                raise SkipRecord(NO_NEG_IMAGE, "method 'ovip' needs a neg_image")
            neg = self._load(rec.neg_image, "neg_image")
        if method == "lpoi":
            lst = rec.image_list
            if not lst:
                raise SkipRecord(NO_IMAGE_LIST, "method 'lpoi' needs an image_list")
            if len(lst) == self.list_size - 1:
                list_images = [image] + [self._load(x, f"image_list[{k}]") for k, x in enumerate(lst)]
            elif len(lst) == self.list_size:
                list_images = [self._load(x, f"image_list[{k}]") for k, x in enumerate(lst)]
            else:
                raise SkipRecord(
                    BAD_IMAGE_LIST,
                    f"image_list has {len(lst)} images: expected list_size={self.list_size} (x_1..x_L) or "
                    f"{self.list_size - 1} (x_2..x_L, the record's image is x_1)",
                )
        ref = self._ref_logps(rec)
        weights_spec = rec.extra.get("token_weights") if method == "catpo" else None

        n_img = len(images)
        p_img = self._render_prompt(prompt, n_img)
        prompt_ids, vision = self._encode_prompt(p_img, images)
        c_ids = self._response_ids(prompt, chosen, n_img)
        r_ids = self._response_ids(prompt, rejected, n_img)
        row_c, n_c = self._row(prompt_ids, c_ids, vision)
        row_r, n_r = self._row(prompt_ids, r_ids, vision)
        ex = _Example(id=rec.id, chosen=row_c, rejected=row_r, n_chosen=n_c, n_rejected=n_r, ref_logps=ref)

        if method == "tpo":
            noised = [_to_pil(self.noised_pixels(img, rec.id if k == 0 else f"{rec.id}#{k}", draw))
                      for k, img in enumerate(images)]
            ids, vis = self._encode_prompt(p_img, noised)
            if ids != prompt_ids:  # same image size -> same image-token count; guard anyway
                raise RuntimeError(f"the noised image of {rec.id!r} changed the prompt's tokens")
            # two rows per example; _assemble orders them chosen-first like the main rows
            ex.sub["noised"] = [_Row(row_c.ids, row_c.labels, vis), _Row(row_r.ids, row_r.labels, vis)]
        elif method == "mdpo":
            box = self.example_crop_box(rec, image.width, image.height, draw)
            cropped = image.crop(box).resize(image.size, _bicubic())
            ids, vis = self._encode_prompt(p_img, [cropped])
            ex.sub["crop"] = [self._row(ids, c_ids, vis)[0]]
        elif method == "ovip":
            p_txt = self._render_prompt(prompt, 0)
            ids, _ = self._encode_prompt(p_txt, None)
            if self.image_token_id in ids:
                raise RuntimeError("the image-free prompt still holds image tokens: check the chat template")
            responses = [chosen, rejected] if self.ovip_rejected else [chosen]
            ex.sub["noimg"] = [self._row(ids, self._response_ids(prompt, r, 0), None)[0]
                               for r in responses]
            ids, vis = self._encode_prompt(p_img, [neg])
            ex.sub["negimg"] = [self._row(ids, r_ids_, vis)[0] for r_ids_ in [c_ids, r_ids][: len(responses)]]
        elif method == "lpoi":
            rows = []
            for img in list_images:
                ids, vis = (prompt_ids, vision) if img is image else self._encode_prompt(p_img, [img])
                rows.append(self._row(ids, c_ids, vis)[0])
            ex.sub["list"] = rows
        elif method == "catpo" and weights_spec is not None:
            ex.token_weights = self._token_weights(weights_spec, len(c_ids), len(r_ids), n_c, n_r)
        return ex

    def _ref_logps(self, rec: PreferenceRecord) -> Optional[Tuple[float, float]]:
        ref = rec.extra.get("ref_logps")
        if ref is None:
            return None
        if not isinstance(ref, Mapping):
            raise SkipRecord(BAD_FIELD, f"ref_logps must map method -> [chosen, rejected], got {type(ref).__name__}")
        val = ref.get(self.method)
        if val is None:
            return None
        ok = isinstance(val, (list, tuple)) and len(val) == 2
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in val)
        if not ok:
            raise SkipRecord(BAD_FIELD, f"ref_logps[{self.method!r}] must be [chosen, rejected] finite numbers, "
                                        f"got {val!r}")
        return float(val[0]), float(val[1])

    def _token_weights(self, spec, len_c: int, len_r: int, n_c: int, n_r: int):
        if not isinstance(spec, Mapping):
            raise SkipRecord(BAD_TOKEN_WEIGHTS, f"token_weights must be {{'chosen': [...], 'rejected': [...]}}, "
                                                f"got {type(spec).__name__}")
        out = []
        for key, n_full, n_kept in (("chosen", len_c, n_c), ("rejected", len_r, n_r)):
            w = spec.get(key)
            ok = isinstance(w, (list, tuple)) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in w
            )
            if not ok:
                raise SkipRecord(BAD_TOKEN_WEIGHTS, f"token_weights[{key!r}] must be a list of finite numbers")
            if len(w) != n_full:
                raise SkipRecord(
                    BAD_TOKEN_WEIGHTS,
                    f"token_weights[{key!r}] has {len(w)} weights but the {key} response has {n_full} tokens "
                    f"(its end-of-turn token included)",
                )
            out.append([float(v) for v in w[:n_kept]])
        return out[0], out[1]

    def _row(self, prompt_ids: List[int], resp_ids: List[int], vision) -> Tuple[_Row, int]:
        n = len(resp_ids)
        if self.max_length is not None:
            room = self.max_length - len(prompt_ids)
            if room < 1:
                raise SkipRecord(TOO_LONG, f"the prompt has {len(prompt_ids)} tokens: no room for a response "
                                           f"within max_length={self.max_length}")
            n = min(n, room)
        resp = resp_ids[:n]
        return _Row(prompt_ids + resp, [IGNORE_INDEX] * len(prompt_ids) + resp, vision), n



# ------------------------------------------------------------------------------------------------------- helpers
def _check_int(name: str, value, lo: Optional[int], hi: Optional[int]) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int, got {type(value).__name__}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return value
