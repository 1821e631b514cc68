"""What the scripts check about the engine a launch asked for, without launching anything (fast)."""

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from hf_reinforce import engines
from hf_reinforce.cli import cpu_flag_to_script


LAUNCH_ENVIRONMENTS = {
    "ddp": {},
    "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "zero3": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
    "fsdp2": {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
}


@pytest.fixture
def launched(monkeypatch):
    """Set the environment `accelerate launch` gives its processes for one of the shipped configs."""

    def launch(config: str, world_size: int = 2):
        for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_FSDP"):
            monkeypatch.delenv(name, raising=False)
        for name, value in {**LAUNCH_ENVIRONMENTS[config], "WORLD_SIZE": str(world_size)}.items():
            monkeypatch.setenv(name, value)

    return launch


def accelerator(distributed_type, num_processes=2, zero_stage=None):
    state = SimpleNamespace(distributed_type=distributed_type, deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
    return SimpleNamespace(state=state, distributed_type=distributed_type, num_processes=num_processes)


@pytest.mark.parametrize(
    ("config", "engine", "shards"),
    [("ddp", None, False), ("zero2", "zero2", False), ("zero3", "zero3", True), ("fsdp2", "fsdp2", True)],
)
def test_launched_engine_is_read_from_the_launch_environment(launched, config, engine, shards):
    launched(config)
    assert engines.launched_engine() == engine
    assert engines.engine_shards_base() is shards


def test_a_config_whose_engine_did_not_engage_is_refused(launched):
    launched("fsdp2")
    with pytest.raises(RuntimeError, match="asks for fsdp2, but the processes run DistributedType.MULTI_CPU"):
        engines.check_engine_engaged(accelerator(DistributedType.MULTI_CPU))
    launched("zero3")
    engines.check_engine_engaged(accelerator(DistributedType.DEEPSPEED, zero_stage=3))


def test_processes_that_each_train_alone_are_refused(launched):
    launched("ddp", world_size=2)
    with pytest.raises(RuntimeError, match="2 processes were launched but the accelerator sees 1"):
        engines.check_engine_engaged(accelerator(DistributedType.NO, num_processes=1))


def test_fsdp_refuses_4bit_weights_it_cannot_shard(launched):
    model_args = SimpleNamespace(load_in_4bit=True, bnb_4bit_quant_storage=None, dtype="bfloat16")
    launched("fsdp2")
    with pytest.raises(ValueError, match="--bnb_4bit_quant_storage bfloat16"):
        engines.check_quantization_for_engine(model_args)
    model_args.bnb_4bit_quant_storage = "bfloat16"
    engines.check_quantization_for_engine(model_args)
    launched("ddp")
    engines.check_quantization_for_engine(SimpleNamespace(load_in_4bit=True, bnb_4bit_quant_storage=None))


def test_reward_adapter_stays_off_a_sharded_base(launched):
    launched("zero3")
    assert engines.reward_sharing(None) is False
    with pytest.raises(ValueError, match="reward_shares_base=True .* zero3 shards"):
        engines.reward_sharing(True)
    launched("zero2")
    assert engines.reward_sharing(None) is None


def test_cpu_flag_keeps_the_config_process_count():
    launch_args, script_args = cpu_flag_to_script(["--num_processes", "2", "--cpu"], ["--config", "recipe.yaml"])
    assert launch_args == ["--num_processes", "2"]
    assert script_args == ["--config", "recipe.yaml", "--use_cpu", "true"]
    assert cpu_flag_to_script(["--num_processes", "2"], ["--config", "r.yaml"]) == (
        ["--num_processes", "2"],
        ["--config", "r.yaml"],
    )
