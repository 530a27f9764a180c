"""The shipped configs parse, and the GPU-only FSDP (FSDP1) config really wraps and checkpoints every decoder layer."""

import sys

import pytest
import yaml
from conftest import REPO
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from transformers.modeling_layers import GradientCheckpointingLayer

from pear_lightning.cli.commands import main

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["model_name_or_path"]


def test_the_fsdp_config_wraps_and_checkpoints_every_decoder_layer():
    """FSDP1 cannot run on a CPU (Lightning refuses), so build its strategy from the YAML without a Trainer."""
    section = yaml.safe_load((REPO / "configs" / "qwen2.5-7b-fsdp-8gpu.yaml").read_text())["trainer"]["strategy"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": section})).strategy
    assert isinstance(strategy, FSDPStrategy)
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(wrap, ModuleWrapPolicy) and wrap._module_classes == {GradientCheckpointingLayer}
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert isinstance(checkpointing, ModuleWrapPolicy) and checkpointing._module_classes == {GradientCheckpointingLayer}
