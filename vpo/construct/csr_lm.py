"""A transformers VLM as CSR's :class:`~vpo.construct.csr_search.TokenLM`, and the policy loader."""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from vpo.construct._io import check_int, check_path


_FAMILY_OF_MODEL_TYPE = {"llava": "llava", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "idefics2": "idefics2"}


class VLMTokenLM:
    """A transformers VLM as a :class:`TokenLM` for one (image, prompt).

    The prompt row is the trainer's: :class:`vpo.data.PreferenceCollator` renders the chat template with the image and
    tokenizes it exactly as it will at training time; the response tokens follow it. End-of-response tokens are the
    tokenizer's eos plus the special tokens the chat template closes an assistant turn with. Special tokens other
    than those, and ids outside the tokenizer's vocabulary, are never proposed (their logits are masked and the
    distribution renormalized), so an image placeholder can never be generated.

    Each call runs the model on ``[prompt + prefix]`` rows (right-padded, no KV cache: fine for the tiny models and
    CPU demos; a long response on a 7B model recomputes the prompt every step).

    Args:
        model: a ``*ForConditionalGeneration`` (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics2), eval mode.
        processor: its processor, with a chat template.
        image: a PIL image. prompt: the user's question (plain text).
        family: the model family (default: from ``model.config.model_type``).
        max_batch: rows per forward.
    """

    def __init__(self, model, processor, image, prompt: str, *, family: Optional[str] = None, max_batch: int = 16):
        from vpo.data import VISION_KEYS, PreferenceCollator, PreferenceRecord

        if family is None:
            mt = getattr(getattr(model, "config", None), "model_type", None)
            if mt not in _FAMILY_OF_MODEL_TYPE:
                raise ValueError(f"model has model_type={mt!r}: expected one of {sorted(_FAMILY_OF_MODEL_TYPE)}, "
                                 f"or pass family=")
            family = _FAMILY_OF_MODEL_TYPE[mt]
        self.model, self.processor, self.family = model, processor, family
        self.tokenizer = processor.tokenizer
        self.max_batch = check_int("max_batch", max_batch, 1)
        collator = PreferenceCollator(processor, family, method="dpo")
        batch = collator([PreferenceRecord("csr-prompt", image, prompt, ".", ".")])
        if not batch.get("ids"):
            raise ValueError(f"the prompt could not be encoded with this image: {batch.get('skipped')}")
        labels = batch["labels"][0]
        resp = (labels != -100).nonzero().flatten()
        start = int(resp[0])
        self.prompt_ids = batch["input_ids"][0, :start].tolist()
        special = set(self.tokenizer.all_special_ids)
        special |= {int(i) for i, tok in getattr(self.tokenizer, "added_tokens_decoder", {}).items()
                    if getattr(tok, "special", False)}
        special |= {int(t) for t in (collator.image_token_id, collator.video_token_id) if t is not None}
        tail = [int(t) for t in labels[resp].tolist() if int(t) in special]  # the template's end-of-turn tokens
        eos = [] if self.tokenizer.eos_token_id is None else [int(self.tokenizer.eos_token_id)]
        self.eos_token_ids = tuple(dict.fromkeys(tail[:1] + eos))
        self.pad_id = collator.pad_token_id
        self.image_token_id = collator.image_token_id
        self.video_token_id = collator.video_token_id
        # One row's vision tensors: the batch holds two identical rows (chosen, rejected) -> the first half of each.
        self.vision = {}
        for key in VISION_KEYS[family]:
            if key == "mm_token_type_ids":
                continue
            t = batch[key]
            self.vision[key] = t[: t.shape[0] // 2]
        self.uses_mm_types = "mm_token_type_ids" in VISION_KEYS[family]
        V = int(model.get_output_embeddings().weight.shape[0])
        valid = set(self.tokenizer.get_vocab().values())
        allowed = torch.zeros(V, dtype=torch.bool)
        allowed[[t for t in valid if 0 <= t < V and (t not in special or t in self.eos_token_ids)]] = True
        self._banned = ~allowed
        self.device = next(model.parameters()).device

    def token_id(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"sentence_end {text!r} must be exactly one token, got {len(ids)} tokens {ids}")
        return int(ids[0])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def next_logprobs(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        outs = [self._forward(prefixes[i:i + self.max_batch]) for i in range(0, len(prefixes), self.max_batch)]
        return torch.cat(outs, dim=0)

    def _forward(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        rows = [self.prompt_ids + [int(t) for t in p] for p in prefixes]
        n, T = len(rows), max(len(r) for r in rows)
        ids = torch.full((n, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, T), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding, as in training
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        for key, t in self.vision.items():
            inputs[key] = torch.cat([t] * n, dim=0)
        if self.uses_mm_types:
            mm = (ids == self.image_token_id).long()
            if self.video_token_id is not None:
                mm = mm + 2 * (ids == self.video_token_id).long()
            inputs["mm_token_type_ids"] = mm * mask
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            logits = self.model(**inputs).logits                       # [n, T, V]
        last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
        z = logits[torch.arange(n, device=logits.device), last].float()  # [n, V]
        z = z.masked_fill(self._banned.to(z.device), -math.inf)
        return torch.log_softmax(z, dim=-1).cpu()


def vlm_factory(model, processor, *, family: Optional[str] = None) -> Callable[[Any, str], VLMTokenLM]:
    """``lm_factory(image, prompt) -> VLMTokenLM`` for :func:`write_csr_dataset`."""
    model.eval()

    def factory(image, prompt: str) -> VLMTokenLM:
        return VLMTokenLM(model, processor, image, prompt, family=family)

    return factory


def load_policy(model_path: str, *, device: str = "cpu", seed: int = 0):
    """``(model, processor)`` for CSR generation: ``tiny:<family>`` builds a tiny random model
    (:mod:`vpo.models.tiny`, weights from ``seed``) with a tiny word-level processor over the shapes world's
    vocabulary (``build_tiny_processor(family, tiny=tiny, words=shapes.vocabulary())``, as :mod:`vpo.online` does);
    anything else is a local folder (``AutoModelForImageTextToText`` + ``AutoProcessor``, ``local_files_only=True``).
    """
    if not isinstance(model_path, str) or not model_path:
        raise ValueError(f"model_path must be tiny:<family> or a local folder, got {model_path!r}")
    if model_path.startswith("tiny:"):
        from vpo import models
        from vpo.data import build_tiny_processor
        from vpo.worlds import shapes

        family = model_path.split(":", 1)[1]
        builder = getattr(models, f"tiny_{family}", None)
        if builder is None:
            raise ValueError(f"model_path {model_path!r}: expected tiny:llava, tiny:qwen2_vl, tiny:qwen2_5_vl or "
                             f"tiny:idefics2")
        tiny = builder(seed)
        processor = build_tiny_processor(family, tiny=tiny, words=shapes.vocabulary())
        return tiny.model.to(device).eval(), processor
    check_path("model_path", model_path, must_exist=True, is_dir=True)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
    return model.to(device).eval(), processor
