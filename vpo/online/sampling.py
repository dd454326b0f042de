"""Sample ``k`` responses per prompt from a vision-language model with ``generate``, reproducibly.

OViP's first stage (docs/methods.md, OViP; paper 002, Sec. 2.2): the current policy answers each (image, prompt) ``k``
times by stochastic sampling (k = 16, temperature 1.2 in the paper's analysis).

How a call runs:

1. Each prompt becomes the user turn ``[{"type": "image"}, {"type": "text", "text": prompt}]``, rendered with the
   processor's chat template and ``add_generation_prompt=True`` (as :class:`vpo.data.PreferenceCollator` renders the
   prompt it trains on), and is run through the processor with its image, LEFT-padded.
2. The processed prompts are expanded ``k`` times (row ``b * k + j`` is sample ``j`` of prompt ``b``; Qwen-VL's
   flattened ``pixel_values`` are expanded per image) and ``model.generate`` runs greedy decoding with one extra
   logits processor, :class:`KeyedSampler`, that does the sampling itself: it applies temperature, top-k and top-p
   and draws the next token by inverse-CDF from a uniform ``u[row, step]``, returning ``-inf`` everywhere except the
   drawn token so the greedy ``argmax`` picks it.
3. ``u[row, :]`` is drawn up front by a CPU ``torch.Generator`` seeded from ``(seed, key_b, j)``, where ``key_b`` is
   the prompt's key (default: its index in the call). So the sample stream of a (prompt, j) depends only on
   ``seed``, its key and ``j``: not on the batch size, the other prompts, the device or the global RNG (which is left
   untouched). Identical logits therefore give identical samples; logits that differ in the last bits (another
   padding length, another device, another kernel) can flip a draw that lands within rounding of a CDF boundary.
4. New tokens are decoded with ``skip_special_tokens=True`` and stripped.

``temperature = 0`` is plain greedy decoding (all ``k`` samples are then identical).

Example:
    >>> from vpo.models import tiny_llava
    >>> from vpo.data import build_tiny_processor
    >>> from vpo.online import sample_responses
    >>> from vpo.worlds import shapes
    >>> tiny = tiny_llava()
    >>> processor = build_tiny_processor("llava", tiny=tiny, words=shapes.vocabulary())
    >>> image = shapes.render(shapes.random_scene(__import__("numpy").random.default_rng(0)))
    >>> out = sample_responses(tiny.model, processor, ["describe the image."], [image], k=3, max_new_tokens=4)
    >>> len(out), len(out[0])
    (1, 3)
"""
from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence

import torch

from vpo._validate import check_range


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions (``hash()`` is not)."""
    h = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class KeyedSampler:
    """A ``transformers`` logits processor that samples with pre-drawn uniforms, one per (row, step).

    Args:
        uniforms: ``[R, S]`` float64 in ``[0, 1)``; row ``r`` draws its ``s``-th new token with ``uniforms[r, s]``.
        prompt_len: the (padded) prompt length ``T0``: step ``s = input_ids.shape[1] - T0``.
        temperature: > 0; the logits are divided by it.
        top_k: keep the ``top_k`` largest logits (0 = all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (1.0 = all); the
            most likely token is always kept.

    ``__call__(input_ids [R, T], scores [R, V]) -> [R, V]``: 0 at the drawn token, ``-inf`` elsewhere.
    The draw: ``p = softmax(filtered(scores) / T)`` in float32, ``c = cumsum(p)`` in float64, token = the first ``v``
    with ``c[v] > u * c[V-1]`` (scaling by the total makes rounding in the sum harmless).
    """

    def __init__(self, uniforms: torch.Tensor, prompt_len: int, temperature: float, top_k: int = 0,
                 top_p: float = 1.0):
        self.uniforms = uniforms
        self.prompt_len = int(prompt_len)
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.top_p = float(top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_len
        if not 0 <= step < self.uniforms.shape[1] or scores.shape[0] != self.uniforms.shape[0]:
            raise RuntimeError(
                f"KeyedSampler: step {step} of rows {scores.shape[0]} is outside its uniforms "
                f"{tuple(self.uniforms.shape)}: generate() ran longer or wider than it was set up for"
            )
        logits = scores.float() / self.temperature  # [R, V]
        V = logits.shape[-1]
        if 0 < self.top_k < V:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]  # [R, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
            drop_sorted = before >= self.top_p  # the top token has before = 0 and is always kept
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [R, V]
        cdf = torch.cumsum(probs.double(), dim=-1)  # [R, V]
        u = self.uniforms[:, step].to(device=cdf.device) * cdf[:, -1]  # [R]
        token = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp_(max=V - 1)  # [R, 1]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


def _render_prompts(processor, prompts: Sequence[str]) -> List[str]:
    texts = []
    for p in prompts:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
        texts.append(processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    return texts


def _encode(processor, texts: List[str], images: List[Any]) -> Dict[str, torch.Tensor]:
    tok = getattr(processor, "tokenizer", processor)
    bos = getattr(tok, "bos_token", None)
    # As the collator: a template that already writes the bos must not get a second one.
    add_special = not (bos is not None and all(t.startswith(bos) for t in texts))
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        out = processor(text=texts, images=images, return_tensors="pt", padding=True,
                        add_special_tokens=add_special)
    finally:
        tok.padding_side = old_side
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def expand_inputs(inputs: Dict[str, torch.Tensor], k: int) -> Dict[str, torch.Tensor]:
    """Repeat every prompt row ``k`` times (row ``b`` -> rows ``b*k .. b*k+k-1``).

    Tensors with ``B`` rows are ``repeat_interleave``-d; Qwen-VL's flattened ``pixel_values``
    ``[Σ_b t_b h_b w_b, D]`` are split per image by ``image_grid_thw`` and each chunk repeated.
    """
    B = inputs["input_ids"].shape[0]
    out = {}
    for key, v in inputs.items():
        if key == "pixel_values" and "image_grid_thw" in inputs:
            sizes = inputs["image_grid_thw"].prod(-1).tolist()  # patches per image
            if len(sizes) != B or sum(sizes) != v.shape[0]:
                raise ValueError(f"pixel_values has {v.shape[0]} patch rows and image_grid_thw describes {sizes}: "
                                 f"expected one image per prompt ({B})")
            out[key] = torch.cat([c for c in v.split(sizes) for _ in range(k)])
        elif v.dim() > 0 and v.shape[0] == B:
            out[key] = v.repeat_interleave(k, dim=0)
        else:
            raise ValueError(f"cannot expand processor output {key!r} of shape {tuple(v.shape)} to {k} samples per "
                             f"prompt: expected {B} rows")
    return out


def _generation_config(model, tok, max_new_tokens: int):
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    eos = []
    for e in (getattr(tok, "eos_token_id", None), getattr(base, "eos_token_id", None)):
        for x in (e if isinstance(e, (list, tuple)) else [e]):
            if x is not None and x not in eos:
                eos.append(int(x))
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(base, "pad_token_id", None)
    if pad is None and eos:
        pad = eos[0]
    use_cache = getattr(base, "use_cache", True)
    # A fresh config: the checkpoint's own sampling defaults (temperature, top_p, ...) must not leak in.
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos or None,
                            pad_token_id=pad, use_cache=True if use_cache is None else bool(use_cache))


def sample_responses(
    model,
    processor,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    k: int = 16,
    temperature: float = 1.2,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    keys: Optional[Sequence[Any]] = None,
    batch_size: Optional[int] = 8,
) -> List[List[str]]:
    """Sample ``k`` responses to each (image, prompt) from ``model`` (module docstring: method and reproducibility).

    Args:
        model: a ``transformers`` VLM (or a peft model of one) with ``generate``; switched to ``eval()`` for the
            call and back to its previous mode after.
        processor: its processor, with a chat template (a real checkpoint's or
            :func:`vpo.data.build_tiny_processor`'s).
        prompts: ``B`` user prompts, plain text (the chat template inserts the image).
        images: ``B`` images (PIL, or anything the processor accepts), one per prompt.
        k: samples per prompt (>= 1).
        temperature: >= 0; 0 = greedy.
        top_k / top_p: filters applied before sampling (0 / 1.0 = off).
        max_new_tokens: the longest response, in tokens.
        seed: the call's seed (use a new one per online step).
        keys: one key per prompt for its random stream (default: ``0 .. B-1``). Pass stable ids to make a prompt's
            samples independent of its position in the call.
        batch_size: prompts per ``generate`` call (each expanded to ``k`` rows); ``None`` = all at once.

    Returns:
        ``B`` lists of ``k`` strings: ``out[b][j]`` = sample ``j`` of prompt ``b``.
    """
    prompts, images = list(prompts), list(images)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    check_range("temperature", temperature, 0.0, float("inf"))
    check_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if len(images) != len(prompts):
        raise ValueError(f"images has {len(images)} items but prompts has {len(prompts)}: expected one per prompt")
    if any(not isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be strings")
    keys = list(range(len(prompts))) if keys is None else list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"keys has {len(keys)} items but prompts has {len(prompts)}: expected one per prompt")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if not prompts:
        return []
    step = len(prompts) if batch_size is None else batch_size
    tok = getattr(processor, "tokenizer", processor)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    out: List[List[str]] = []
    try:
        for lo in range(0, len(prompts), step):
            chunk = slice(lo, lo + step)
            out.extend(_sample_chunk(model, processor, tok, param, prompts[chunk], images[chunk], keys[chunk], k,
                                     temperature, top_k, top_p, max_new_tokens, seed))
    finally:
        model.train(was_training)
    return out


def _sample_chunk(model, processor, tok, param, prompts, images, keys, k, temperature, top_k, top_p,
                  max_new_tokens, seed) -> List[List[str]]:
    inputs = _encode(processor, _render_prompts(processor, prompts), images)
    inputs = expand_inputs(inputs, k)
    inputs = {key: (v.to(device=param.device, dtype=param.dtype) if v.is_floating_point() else v.to(param.device))
              for key, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    gen_kwargs = {}
    if temperature > 0:
        rows = []
        for key in keys:
            for j in range(k):
                g = torch.Generator().manual_seed(stream_seed("vpo.online.sample", seed, key, j))
                rows.append(torch.rand(max_new_tokens, generator=g, dtype=torch.float64))
        uniforms = torch.stack(rows).to(param.device)  # [B*k, max_new_tokens]
        gen_kwargs["logits_processor"] = [KeyedSampler(uniforms, prompt_len, temperature, top_k, top_p)]
    with torch.no_grad():
        seqs = model.generate(**inputs, generation_config=_generation_config(model, tok, max_new_tokens),
                              **gen_kwargs)
    texts = processor.batch_decode(seqs[:, prompt_len:], skip_special_tokens=True)
    texts = [t.strip() for t in texts]
    return [texts[b * k:(b + 1) * k] for b in range(len(prompts))]
