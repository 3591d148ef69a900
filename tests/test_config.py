"""EngineConfig and config.json validation: clear errors naming the field, no Ray needed."""

from __future__ import annotations

import json
import shutil

import pytest

from actors.model import load_spec
from orchestrator import ConfigError, EngineConfig
from tests.support import write_checkpoint


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cfg") / "llama", "llama")


def edited(tmp_path, source, **changes):
    target = tmp_path / "edited"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_valid_config_parses_the_model(llama_dir):
    cfg = EngineConfig(model=str(llama_dir), tensor_parallel_size=4, num_cpus_per_rank=0.25)
    spec = cfg.model_spec
    assert (spec.family, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("llama", 4, 2, 16)
    assert spec.rope.rope_type == "llama3" and spec.rope.original_max_position_embeddings == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tensor_parallel_size=3), "does not divide num_attention_heads=4"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be > 0"),
        (dict(tensor_parallel_size=2.0), "tensor_parallel_size must be int"),
        (dict(dtype="float8"), "EngineConfig.dtype='float8' is not one of"),
        (dict(device="tpu"), "EngineConfig.device='tpu'"),
        (dict(quantization="int3"), "quantization='int3' is unknown"),
        (dict(num_cpus_per_rank=0), "num_cpus_per_rank must be > 0"),
        (dict(num_engines=True), "num_engines must be int"),
    ],
)
def test_bad_field_is_named(llama_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(model=str(llama_dir), **kwargs)


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        EngineConfig(model=str(tmp_path))


def test_unknown_architecture(tmp_path, llama_dir):
    path = edited(tmp_path, llama_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="unknown architecture 'GPT2LMHeadModel'"):
        EngineConfig(model=str(path))


def test_tp_above_kv_heads_must_be_a_multiple(tmp_path, llama_dir):
    path = edited(tmp_path, llama_dir, num_attention_heads=8, num_key_value_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_spec(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(hidden_act="gelu"), "'hidden_act' must be 'silu'"),
        (dict(num_hidden_layers=0), "'num_hidden_layers' must be a positive integer"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn'"),
        (dict(vocab_size=None), "'vocab_size' is missing"),
    ],
)
def test_bad_config_json_field_is_named(tmp_path, llama_dir, changes, message):
    path = edited(tmp_path, llama_dir, **changes)
    with pytest.raises(ValueError, match=message):
        load_spec(path)
