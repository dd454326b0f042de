"""Cat-PO's image-attention statistics for a stack of layers: peak memory and time of the eager route (every layer's
``[B, H, T, T]`` probabilities kept, as ``output_attentions=True`` returns them, then
``image_attention_from_probs``) against the q,k route (``image_attention_from_qk`` per layer from that layer's
post-RoPE q and k, accumulated with ``ImageAttentionAccumulator``; nothing ``[T, T]`` is kept).

``test_attention_stats``: a model-like loop over L layers (``_harness._attention_step``): per layer seeded random
q ``[B, Hq, T, d]`` and k ``[B, Hkv, T, d]`` generated inside the step, so the peak holds one layer's q and k plus what
the route keeps. Output: the head- and layer-averaged ``[B, T, N_p]`` for every query row. The eager row's ratios
are over the q,k route that ``impl="auto"`` picks here (``qk/triton`` on CUDA, ``qk/torch`` on CPU); the project's
target is eager/qk memory ≥ 20× at LLaVA-1.5-7B's shape on GPU (T=2048, N_p=576, 32 layers × 32 heads, d=128,
bf16; eager keeps 8 GiB of maps), and the same kind of ratio on CPU at ``cpu-llava-depth`` (the same 32 layers,
T=512, N_p=64, 8 heads, d=32, fp32: 256 MiB of maps). The torch q,k path holds one ``[B, H, C, T]`` score tile of
at most 2**24 elements (plus ~50% of temporaries), so while one layer's map fits the tile its ratio is ~L/1.5:
~6× at ``cpu-attn-small`` (8 layers), ~20× at 32 layers; the Triton path holds no tile at all.

``test_attention_e2e``: the same comparison through a real ``transformers`` forward of a tiny LLaVA
(``vpo.models.tiny_llava``; 8 layers, 8 heads over 4 kv heads, T=512, N_p=144, a pair of rows): the eager model
with ``output_attentions=True`` against the sdpa model inside ``vpo.integrations.capture_image_attention``. Needs
transformers (skipped without). Speed is measured, never asserted.
"""
import pytest

import _harness as H


@pytest.mark.parametrize("case", H.cases("attention_stats"), ids=lambda c: c.id)
def test_attention_stats(benchmark, case):
    H.run_benchmark(benchmark, case)


@pytest.mark.parametrize("case", H.cases("attention_e2e"), ids=lambda c: c.id)
def test_attention_e2e(benchmark, case):
    H.run_benchmark(benchmark, case)
