"""The shipped configs: every run config parses, the logger snippets layer on a run config, and the GPU-only FSDP
(FSDP1) config really wraps and checkpoints every decoder layer."""

import sys

import pytest
import yaml
from conftest import REPO, run_cli
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy
from transformers import AutoModelForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer

from pear_lightning.cli.commands import main

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
CONFIG_LOGGERS = sorted((REPO / "configs" / "loggers").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["model_name_or_path"]


def test_the_fsdp_config_wraps_and_checkpoints_every_decoder_layer(tiny_model_dir):
    """FSDP1 cannot run on a CPU (Lightning refuses), so build its strategy from the YAML without a Trainer, and ask
    its policies which modules of a Llama they pick."""
    section = yaml.safe_load((REPO / "configs" / "qwen2.5-7b-fsdp-8gpu.yaml").read_text())["trainer"]["strategy"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    strategy = parser.instantiate_classes(parser.parse_object({"strategy": section})).strategy
    assert isinstance(strategy, FSDPStrategy)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == model.config.num_hidden_layers
    wrap = strategy.kwargs["auto_wrap_policy"]
    # Lightning keeps the activation-checkpointing policy only in a private attribute; its choice is public
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    for policy in (wrap, checkpointing):
        assert [m for m in model.modules() if policy(m, recurse=False)] == layers


@pytest.mark.parametrize("config", CONFIG_LOGGERS, ids=lambda p: p.name)
def test_logger_snippets_layer_on_a_run_config_and_keep_the_csv(config, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, out, err = run_cli(["fit", "--config", "demo", "--config", str(config), "--print_config"], capsys)
    assert code == 0, err
    loggers = [logger["class_path"] for logger in yaml.safe_load(out)["trainer"]["logger"]]
    assert loggers[0] == "lightning.pytorch.loggers.CSVLogger" and len(loggers) == 2
