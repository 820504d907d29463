"""Every preset loads, and the model presets carry the published HF numbers."""
import pytest

from rsdjax.config import CONFIG_ROOT, load_model_config
from rsdjax.hardware import load_hardware

MODELS = sorted(p.stem for p in (CONFIG_ROOT / "models").glob("*.yaml"))
HARDWARE = sorted(p.stem for p in (CONFIG_ROOT / "hardware").glob("*.yaml"))


@pytest.mark.parametrize("name", MODELS)
def test_model_presets_load(name):
    cfg = load_model_config(name)
    assert cfg.name == name


@pytest.mark.parametrize("name", HARDWARE)
def test_hardware_presets_load_with_sources(name):
    hw = load_hardware(name)
    assert hw.mesh_shape()  # the default mesh covers every device
    for field in ("memory_gb", "mem_bandwidth_gbs", "peak_tflops", "link_gbs", "power_w"):
        figure = getattr(hw.device, field)
        assert figure.source or figure.unconfirmed, f"{name}: {field} has neither a source nor an unconfirmed mark"


@pytest.mark.parametrize("name,params_b", [("llama2-7b", 6.74), ("llama3-8b", 8.03), ("llama3.1-70b", 70.55),
                                           ("llama3.1-405b", 405.85), ("llama3.2-1b", 1.24), ("tedllm-8b", 8.13)])
def test_parameter_counts_match_published_sizes(name, params_b):
    assert abs(load_model_config(name).num_params() / 1e9 - params_b) < 0.01


def test_topologies_from_the_seeds():
    rack = load_hardware("atom-rack")
    assert (rack.nodes, rack.devices_per_node, rack.num_devices, rack.total_power_w) == (14, 16, 224, 35000.0)
    assert load_hardware("atom-server").total_power_w == 2500.0
    cs3x4 = load_hardware("cs3x4")
    assert cs3x4.num_devices * cs3x4.device.memory_gb.value == 176.0


def test_hardware_figures_can_be_overridden():
    hw = load_hardware("atom-card", ["device.mem_bandwidth_gbs.value=512"])
    assert hw.device.mem_bandwidth_gbs.value == 512.0


def test_override_with_invalid_yaml_is_a_config_error():
    from rsdjax.config import ConfigError

    with pytest.raises(ConfigError, match="override 'name=\\[unclosed': value is not valid YAML"):
        load_model_config("tiny", ["name=[unclosed"])
