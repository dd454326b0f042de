"""Prompt tokens are the chat template's with the tokenizer's BOS exactly once — never doubled (a template that
writes BOS itself, then the processor adding it again), never dropped (a template without it, on a tokenizer that
adds it) — for vpo's tuned families and every tiny architecture. TRL's collator drops the BOS instead (docs/trl.md
says why vpo keeps it)."""
import pytest

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from vpo.data import PreferenceCollator, build_tiny_processor, record_from_row  # noqa: E402

ROW = {"image": Image.new("RGB", (32, 32), "red"), "prompt": "what color ?", "chosen": "red .", "rejected": "blue ."}


def _cases():
    from vpo import models
    from vpo.models.tiny_generic import ARCHS
    from vpo.models.tiny_zoo import ZOO

    out = [(f"{family} (tuned)", family) for family in ("llava", "qwen2_vl", "qwen2_5_vl", "idefics2")]
    out += [(arch, "generic") for arch in sorted((*ARCHS, *ZOO))]
    assert models  # the tuned families' builders
    return out


def _tuned(family):
    from vpo import models

    tiny = getattr(models, f"tiny_{family}")(0)
    return build_tiny_processor(family, tiny=tiny)


@pytest.mark.parametrize("name,family", _cases(), ids=[c[0] for c in _cases()])
def test_bos_exactly_once(name, family):
    from vpo.models.tiny_zoo import tiny_architecture

    proc = _tuned(family) if family != "generic" else tiny_architecture(name)[1]
    tok = proc.tokenizer
    bos = tok.bos_token_id
    batch = PreferenceCollator(proc, family, method="dpo")([record_from_row(ROW)])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    rendered = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                        "text": ROW["prompt"]}]}], add_generation_prompt=True, tokenize=False)
    # what the processor alone makes of the rendered prompt: a BOS there is the model's (PaliGemma puts it after the
    # image tokens); a template that writes BOS itself would get a second one from the processor
    plain = proc(text=[rendered], images=[[ROW["image"]]], return_tensors="pt")["input_ids"][0].tolist()
    want = 1 if bos is not None and bos in plain else 0
    if bos is None:
        return
    assert ids.count(bos) == want, (name, ids)
    if tok.bos_token and rendered.startswith(tok.bos_token):
        assert ids[0] == bos  # the template's own BOS, kept once
