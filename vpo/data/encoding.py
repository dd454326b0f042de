"""Chat-template encoding for :class:`vpo.data.PreferenceCollator`: a prompt (text or messages) and its images
rendered by the processor's chat template, the response's tokens in context, and the batching of per-row vision
tensors.

:class:`ChatEncoding` is the collator's base: it reads ``self.processor``, ``self.tokenizer``, ``self.family``,
``self._special_ids``, ``self._type_keys`` and ``self._warned_template``, which the collator sets up.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch

from vpo.data.conversation import prompt_messages, with_response
from vpo.data.records import BAD_IMAGE, SkipRecord

GENERIC = "generic"
# Keys of a processor output that are text-side (rebuilt by the collator), not vision tensors. ``labels``: PaliGemma's
# processor returns prompt-only labels (all -100); kept, they would overwrite the collator's.
_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")
# Vision tensors indexed by token ``[1, T_prompt, ...]`` (Mllama's cross_attention_mask ``[1, T, images, tiles]``):
# the collator extends them over the response (each response token sees what the last prompt token sees) and pads
# them to the row (0: padding attends to no image).
PER_TOKEN_VISION_KEYS = ("cross_attention_mask",)
# The token type of RESPONSE tokens where it is not 0: PaliGemma's token_type_ids are 0 on the prefix (image + prompt,
# attended bidirectionally) and 1 on the suffix (the response, causal); elsewhere they mark image tokens.
RESPONSE_TOKEN_TYPE = {"PaliGemmaProcessor": {"token_type_ids": 1}}


def architecture_of(processor) -> str:
    """A short name of the architecture behind ``processor`` for error messages (its class name)."""
    return type(processor).__name__


class ChatEncoding:
    """How one row's prompt and response become token ids (module docstring)."""

    def _messages(self, prompt: Any, num_images: int, response: Optional[str] = None) -> list:
        """The conversation: ``prompt`` (text or messages) with ``num_images`` image parts, then the response."""
        return with_response(prompt_messages(prompt, num_images), response)

    def _render(self, msgs: list, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _render_prompt(self, prompt: Any, num_images: int) -> str:
        return self._render(self._messages(prompt, num_images), True)

    def _response_ids(self, prompt: Any, response: str, num_images: int) -> List[int]:
        head = self._render_prompt(prompt, num_images)
        full = self._render(self._messages(prompt, num_images, response), False)
        ids = None
        if full.startswith(head):
            text = full[len(head):].rstrip()
            # Tokenize the response in context (after the rendered prompt, image placeholder unexpanded) so a BPE /
            # SentencePiece tokenizer splits its first word as it does inside the full conversation; fall back to the
            # response alone if the prompt's tokens do not survive as a prefix.
            tok = self.tokenizer
            a = tok(head, add_special_tokens=False)["input_ids"]
            b = tok(head + text, add_special_tokens=False)["input_ids"]
            if len(b) > len(a) and b[: len(a)] == a:
                ids = list(b[len(a):])
        else:
            if not self._warned_template:
                warnings.warn(
                    "vpo.data: the chat template's generation prompt is not a prefix of the rendered conversation; "
                    "the response is tokenized as its raw text + eos",
                    stacklevel=3,
                )
                self._warned_template = True
            text = response
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] not in self._special_ids):
            ids.append(eos)
        return ids

    def _encode_prompt(self, text: str, images) -> Tuple[List[int], Optional[Dict[str, torch.Tensor]]]:
        """``(prompt ids, vision tensors)`` of the rendered prompt ``text`` with ``images`` (a list, or None)."""
        bos = self.tokenizer.bos_token
        kwargs = {"add_special_tokens": not (bos is not None and text.startswith(bos))}
        try:
            out = self.processor(text=[text], images=[list(images)] if images else None, return_tensors="pt",
                                 **kwargs)
        except (ValueError, TypeError, OSError) as e:  # a degenerate image (too small, extreme aspect ratio, ...)
            if not images:
                raise
            sizes = ", ".join(f"{im.width}x{im.height}" for im in images)
            raise SkipRecord(BAD_IMAGE, f"the processor rejected the image(s) ({sizes}): {e}") from None
        ids = out["input_ids"][0].tolist()
        types = {}
        if self.family == GENERIC:  # the processor's own token types of the prompt (the response's are 0)
            types = {k: out[k][:1] for k in ("token_type_ids", "mm_token_type_ids") if isinstance(out.get(k),
                                                                                               torch.Tensor)}
            self._type_keys.update(types)
        if not images:
            return ids, None
        vision = {k: v for k, v in out.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        vision.update(types)
        return ids, vision


def extend_per_token(t: torch.Tensor, row_len: int, length: int) -> torch.Tensor:
    """``[1, T_prompt, ...]`` -> ``[1, length, ...]``: positions ``T_prompt .. row_len-1`` (the response) repeat the
    last prompt position, positions from ``row_len`` on (padding) are 0."""
    out = t.new_zeros((t.shape[0], length, *t.shape[2:]))
    n = min(t.shape[1], row_len)
    out[:, :n] = t[:, :n]
    if row_len > n and n > 0:
        out[:, n:row_len] = t[:, n - 1:n]
    return out


def _cat_vision(visions: List[Dict[str, torch.Tensor]], arch: str = "the processor") -> Dict[str, torch.Tensor]:
    """Concatenate per-row vision tensors on dim 0, zero-padding trailing dims that differ (Idefics2's image sizes;
    a zero ``pixel_attention_mask`` marks the padding). ``arch`` names the architecture in errors."""
    out = {}
    for key in visions[0]:
        missing = [i for i, v in enumerate(visions) if key not in v]
        if missing:
            raise ValueError(f"{arch}: cannot batch vision input {key}: row 0 has it, row {missing[0]} does not "
                             f"(its keys: {sorted(visions[missing[0]])})")
        ts = [v[key] for v in visions]
        if any(t.shape[1:] != ts[0].shape[1:] for t in ts):
            if any(t.dim() != ts[0].dim() for t in ts):
                shapes = sorted({tuple(t.shape) for t in ts})
                raise ValueError(f"{arch}: cannot batch vision input {key}: its rank differs across rows (shapes "
                                 f"{shapes}); expected one rank")
            size = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
            padded = []
            for t in ts:
                p = t.new_zeros((t.shape[0], *size))
                p[(slice(None),) + tuple(slice(0, s) for s in t.shape[1:])] = t
                padded.append(p)
            ts = padded
        out[key] = torch.cat(ts, dim=0)
    return out
