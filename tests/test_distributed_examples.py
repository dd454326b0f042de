"""The multi-GPU examples (examples/accelerate/): accelerate configs load as accelerate's own config class and ask for
what vpo supports (FSDP version 2, DeepSpeed ZeRO-2/3); the vpo train configs they name build a VPOConfig (bf16 off:
no GPU here)."""
import glob
import os
import re

import pytest
import yaml

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "accelerate")
FILES = sorted(glob.glob(os.path.join(ROOT, "*.yaml")))


def _is_accelerate(path):
    with open(path) as f:
        return "distributed_type" in yaml.safe_load(f)


@pytest.mark.parametrize("path", [p for p in FILES if _is_accelerate(p)], ids=os.path.basename)
def test_accelerate_configs(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(path)
    if config.distributed_type == "FSDP":
        assert int(config.fsdp_config["fsdp_version"]) == 2
    else:
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] in (2, 3)
    with open(path) as f:
        named = re.findall(r"--config (examples/accelerate/\S+\.yaml)", f.read())
    assert named, "the header names the vpo config to launch"
    for name in named:
        assert os.path.isfile(os.path.join(os.path.dirname(ROOT), "..", name)), name


@pytest.mark.parametrize("path", [p for p in FILES if not _is_accelerate(p)], ids=os.path.basename)
def test_vpo_configs(path, tmp_path):
    from vpo.trainer import VPOConfig

    with open(path) as f:
        values = yaml.safe_load(f)
    values.update(bf16=False, use_cpu=True, output_dir=str(tmp_path))
    config = VPOConfig(**values)
    assert config.ref_mode == ("adapter" if config.use_lora else "model")
