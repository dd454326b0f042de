"""``precompute_reference`` (``vpo precompute-ref``) on 2 gloo ranks: each rank runs its rows ``rank::2``, every rank
gets the whole table in dataset order, rank 0 writes it; equal to the one-process table (ids, order, values to
1e-6: float32 forwards on other batch compositions).

9 records (odd: the ranks get 5 and 4), batch size 2, DPO on a tiny LLaVA with a LoRA adapter (the reference is the
adapter-disabled model).

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node 2 THIS_FILE OUT_DIR``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

N = 9
METHODS = ("dpo",)


def _tables(out_dir: str) -> dict:
    import torch

    from vpo.models import tiny_llava
    from vpo.trainer import VPOConfig
    from vpo.trainer.modeling import apply_lora
    from vpo.trainer.reference import precompute_reference
    from vpo.trainer.synthetic import TinyPreferenceCollator, synthetic_records

    torch.set_num_threads(1)
    out = {}
    for method in METHODS:
        tiny = tiny_llava()
        torch.manual_seed(0)
        model = apply_lora(tiny.model, r=4, alpha=8, dropout=0.0)
        cfg = VPOConfig(output_dir=os.path.join(out_dir, method), method=method, use_cpu=True, report_to="none",
                        fixed_noise=True, ref_mode="precomputed")
        collator = TinyPreferenceCollator(tiny, method, fixed_noise=True)
        path = os.path.join(out_dir, f"{method}_{os.environ.get('RANK', 'single')}.jsonl")
        table = precompute_reference(model, synthetic_records(N, tiny), collator, cfg, batch_size=2, path=path,
                                     progress=False)
        out[method] = {"ids": list(table), "table": table, "wrote": os.path.isfile(path)}
    return out


def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    from vpo.trainer.distributed import init_from_env

    rank, world = init_from_env(use_cpu=True)
    result = _tables(out_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json" if world > 1 else "single.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()  # both ranks done before either tears gloo down
        dist.destroy_process_group()


def test_precompute_reference_across_two_ranks(tmp_path):
    from test_distributed_fsdp import run_two_ranks

    r0, r1 = run_two_ranks(os.path.abspath(__file__), tmp_path, timeout=240)
    single = _tables(str(tmp_path / "single"))
    for method in METHODS:
        one = single[method]
        assert len(one["ids"]) == N
        assert r0[method]["ids"] == r1[method]["ids"] == one["ids"], "not in dataset order"
        assert r0[method]["wrote"] and not r1[method]["wrote"], "rank 0 (only) writes the table"
        for key in one["ids"]:
            for name, values in one["table"][key].items():
                got = r1[method]["table"][key][name]
                assert got == pytest.approx(values, abs=1e-6), (method, key, name)


if __name__ == "__main__":
    _worker(sys.argv[1])
