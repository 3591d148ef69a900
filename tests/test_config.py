"""EngineConfig and config.json validation: clear errors naming the field or the file, no
Ray needed. A config is a pure value: the checkpoint is read by start() / plan()."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from actors.engines import EnginePlugin, register_engine
from actors.engines.native import check_tp, load_spec
from orchestrator import ConfigError, EngineConfig, ReloadOrchestrator
from orchestrator.yaml_config import ServiceConfig
from tests.support import expected_rank_bytes, parent_layer, write_checkpoint


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


def test_config_of_a_missing_checkpoint_is_a_value(tmp_path):
    """Built anywhere, e.g. on a laptop for a cluster path: nothing is read."""
    cfg = EngineConfig(model=tmp_path / "not-yet-written", tensor_parallel_size=8,
                       quantization="fp8")
    assert cfg.model == str(tmp_path / "not-yet-written")
    assert cfg == EngineConfig(model=str(tmp_path / "not-yet-written"), tensor_parallel_size=8,
                               quantization="fp8")


def test_spec_parsed_from_config_json(llama_dir):
    spec = load_spec(llama_dir)
    assert (spec.family, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("llama", 4, 2, 16)
    assert spec.rope.rope_type == "llama3" and spec.rope.original_max_position_embeddings == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be > 0"),
        (dict(tensor_parallel_size=2.0), "tensor_parallel_size must be int, got 2.0"),
        (dict(dtype="float8"), "EngineConfig.dtype='float8' is not one of"),
        (dict(device="tpu"), "EngineConfig.device='tpu'"),
        (dict(quantization="int3"), "quantization='int3' is unknown"),
        (dict(engine="vllm", quantization="int3"), "not an online quantization of vLLM"),
        (dict(num_cpus_per_rank=0), "num_cpus_per_rank must be > 0"),
        (dict(num_gpus_per_rank=1.5), "num_gpus_per_rank must be in (0, 1], got 1.5"),
        (dict(num_engines=True), "num_engines must be int"),
        (dict(timeout_s="soon"), "timeout_s must be a number"),
        (dict(quantization=8), "quantization must be str or None"),
        (dict(kv_calibration_tokens=[[1, "x"]]),
         "kv_calibration_tokens must be list[list[int]] or None"),
        (dict(engine_args={1: 2}), "engine_args must be dict[str, Any]"),
        (dict(engine_args={"x": 1}), "the native engine takes none"),
    ],
)
def test_bad_field_is_named_at_construction(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        EngineConfig(model=str(tmp_path / "absent"), **kwargs)


def test_every_annotated_field_is_type_checked():
    """The checks come from the annotations: a wrong type in any field is refused."""
    from dataclasses import fields

    wrong = {int: "1", float: "1.0", bool: 1, str: 1}
    cfg = EngineConfig(model="m")
    for f in fields(EngineConfig):
        plain = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type))
        if plain is None:
            continue
        with pytest.raises(ConfigError, match=f"EngineConfig.{f.name} must be"):
            EngineConfig(**{**{"model": cfg.model}, f.name: wrong[plain]})


def test_checkpoint_is_read_by_start_naming_its_path(tmp_path, llama_dir):
    """Refused before anything is placed (unmarked `ray`: starting Ray would fail it)."""
    no_config = tmp_path / "no-config"
    shutil.copytree(llama_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ConfigError, match=rf"{no_config}/config.json: config.json not found"):
        ReloadOrchestrator(EngineConfig(model=no_config)).start()
    with pytest.raises(ConfigError, match=rf"{llama_dir}/config.json: tensor_parallel_size=3 "
                                          "does not divide num_attention_heads=4"):
        ReloadOrchestrator(EngineConfig(model=llama_dir, tensor_parallel_size=3)).start()


def test_plan_reads_the_checkpoint_without_ray(tmp_path, llama_dir):
    unknown = edited(tmp_path, llama_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match=rf"{unknown}/config.json: unknown architecture "
                                          "'GPT2LMHeadModel'"):
        ReloadOrchestrator(EngineConfig(model=unknown)).plan(str(unknown))
    plan = ReloadOrchestrator(EngineConfig(model=llama_dir, tensor_parallel_size=2)).plan(
        str(llama_dir))
    # Against the test's own reading of the checkpoint: every tensor, in the module that
    # owns its (fused) parameter, with the bytes each rank must read of it.
    expected = [expected_rank_bytes(llama_dir, 2, rank) for rank in range(2)]
    assert {t.name for t in plan.tensors} == set(expected[0])
    for tensor in plan.tensors:
        assert tensor.layer == parent_layer(tensor.name)
        assert tensor.rank_bytes == (expected[0][tensor.name], expected[1][tensor.name])


def test_tp_above_kv_heads_must_be_a_multiple(tmp_path, llama_dir):
    path = edited(tmp_path, llama_dir, num_attention_heads=24, num_key_value_heads=4,
                  head_dim=8)
    spec = load_spec(path)
    check_tp(spec, 8)  # 8 > 4 KV heads and a multiple of them: each KV head on 2 ranks
    with pytest.raises(ValueError, match="tensor_parallel_size=6 must be a multiple of "
                                         "num_key_value_heads=4"):
        check_tp(spec, 6)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(hidden_act="gelu"), "'hidden_act' must be 'silu'"),
        (dict(num_hidden_layers=0), "'num_hidden_layers' must be a positive integer"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn'"),
        (dict(vocab_size=None), "'vocab_size' is missing"),
        (dict(num_attention_heads=8, num_key_value_heads=3), "num_key_value_heads"),
    ],
)
def test_bad_config_json_field_is_named(tmp_path, llama_dir, changes, message):
    path = edited(tmp_path, llama_dir, **changes)
    with pytest.raises(ValueError, match=message) as info:
        load_spec(path)
    assert str(path / "config.json") in str(info.value)


def test_staged_reload_options_are_refused_before_anything_moves(llama_dir, monkeypatch):
    """No Ray and no engine: an engine without a twin (both of ours have one: a registered
    stand-in declares no 'staging'), or an unknown staging place, is refused by name before
    the source is even listed."""

    class NoTwin(EnginePlugin):
        name, runtime = "no-twin", "tests.test_config:NoSuchRuntime"

    register_engine(NoTwin())
    no_twin = ReloadOrchestrator(EngineConfig(model=str(llama_dir), engine="no-twin"))
    with pytest.raises(ConfigError, match="engine='no-twin' cannot stage reloads"):
        no_twin.reload(str(llama_dir), staged=True)
    native = ReloadOrchestrator(EngineConfig(model=str(llama_dir)))
    with pytest.raises(ValueError, match=r"staging must be one of \('device', 'host'\)"):
        native.reload(str(llama_dir), staged=True, staging="disk")
    with pytest.raises(ValueError, match=r"in_flight must be one of \('keep', 'recompute', "
                                         r"'wait', 'abort'\), got 'pause'"):
        native.reload(str(llama_dir), staged=True, in_flight="pause")
    with pytest.raises(ConfigError, match=r"ServiceConfig.in_flight='later' is not one of"):
        ServiceConfig(in_flight="later")
