"""Safety: no pickle is loaded from data, caches, checkpoints or exports; trust_remote_code is off unless the
config turns it on; a run on local files never touches the network."""

import json
import os
import pickle
import socket

import datasets
import huggingface_hub
import pytest
import torch
from conftest import DEMO, run_cli, write_jsonl
from lightning.fabric.plugins import TorchCheckpointIO
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pear_lightning import PearDataModule
from pear_lightning.behavior.score import describe_inputs
from pear_lightning.cli.commands import main
from pear_lightning.cli.lightning import PearCLI, tool_cli
from pear_lightning.model.checkpoint_io import AtomicCheckpointIO


class Payload:
    """Unpickling it runs code: it creates the folder ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def run_main(args):
    try:
        main(args)
    except SystemExit as exit:
        return exit.code
    return 0


class NetworkBlocked:
    """Records every attempt to resolve a host or open a connection, and refuses it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attempts = []

        def refuse(what):
            def refused(*args, **kwargs):
                self.attempts.append((what, args[1:2] if what == "connect" else args[:1]))
                raise OSError(f"network blocked by the test ({what})")

            return refused

        monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
        monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
        monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
        monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
        # Online as far as the libraries know (the tests otherwise run with HF_HUB_OFFLINE=1).
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")


def forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every pickle load fail, and torch.load without weights_only=True."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    torch_load = torch.load

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "torch.load without weights_only=True"
        return torch_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A two-step run and a behaviour log-prob cache, both made with the network blocked, the libraries told
    they are online, and pickle loading forbidden; returns the config, the checkpoint, the cache and the
    network attempts."""
    root = tmp_path_factory.mktemp("safety")
    rows = [json.loads(line) for line in open(DEMO / "data" / "train.jsonl")][:8]
    train = write_jsonl(root / "train.jsonl", [{k: r[k] for k in ("id", "messages")} for r in rows])
    config = root / "run.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"model_name_or_path": str(tiny_model_dir)},
                "data": {"train_path": str(train), "batch_size": 4},
                "trainer": {
                    "accelerator": "cpu",
                    "max_steps": 2,
                    "logger": False,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "default_root_dir": str(root),
                },
            }
        )
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr("sys.argv", ["pear_lightning"])
        network = NetworkBlocked(monkeypatch)
        forbid_unpickling(monkeypatch)
        assert run_main(["fit", "--config", str(config)]) == 0
        cache = root / "cache"
        assert run_main(["cache_logprobs", "--config", str(config), "--output", str(cache)]) == 0
    (checkpoint,) = (root / "checkpoints").glob("*.ckpt")
    return {"root": root, "config": config, "train": train, "checkpoint": checkpoint, "cache": cache, **vars(network)}


def test_a_run_on_local_files_never_touches_the_network(trained):
    assert trained["attempts"] == []


def test_the_cache_join_and_export_load_no_pickle_and_export_writes_safetensors(
    trained, tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr("sys.argv", ["pear_lightning"])
    network = NetworkBlocked(monkeypatch)
    forbid_unpickling(monkeypatch)
    data = PearDataModule(
        train_path=str(trained["train"]),
        tokenizer_name_or_path=str(tiny_model_dir),
        logprobs_path=str(trained["cache"]),
        batch_size=4,
    )
    data.setup("fit")
    assert next(iter(data.train_dataloader()))["behavior_logp"] is not None
    output = tmp_path / "exported"
    args = ["export", "--config", str(trained["config"]), "--checkpoint", str(trained["checkpoint"])]
    assert run_main([*args, "--output", str(output)]) == 0
    assert network.attempts == []
    weights = sorted(p.name for p in output.iterdir() if p.suffix not in (".json", ".jinja", ".txt"))
    assert weights == ["model.safetensors"]  # no .bin / .pt / .pkl anywhere
    monkeypatch.undo()
    exported = AutoModelForCausalLM.from_pretrained(output, use_safetensors=True)
    state = torch.load(trained["checkpoint"], weights_only=True)["state_dict"]
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, state[f"model.{name}"], rtol=0, atol=0)


def test_resuming_never_unpickles_code_even_where_torch_would(trained, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    checkpoint = torch.load(trained["checkpoint"], weights_only=True)
    torch.save({**checkpoint, "payload": Payload(str(marker))}, evil)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default load would now run it:
    TorchCheckpointIO().load_checkpoint(evil)
    assert marker.is_dir()
    marker.rmdir()
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        AtomicCheckpointIO().load_checkpoint(evil)
    monkeypatch.setattr("sys.argv", ["pear_lightning"])
    capsys.readouterr()
    code, _, err = run_cli(["fit", "--config", str(trained["config"]), "--ckpt_path", str(evil)], capsys)
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: --ckpt_path {evil}: holds objects other than tensors and plain data (os.makedirs, which could run code when "
        "loaded), so it is not loaded; give a checkpoint written by fit (a .ckpt file, or the folder a sharded run "
        "writes)"
    ]
    assert not marker.exists()
    assert AtomicCheckpointIO().load_checkpoint(trained["checkpoint"])["global_step"] == 2  # ours load weights-only


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_off_unless_the_config_turns_it_on(trained, tiny_model_dir, monkeypatch, trust):
    monkeypatch.setattr("sys.argv", ["pear_lightning"])
    calls = []
    for cls in (AutoModelForCausalLM, AutoTokenizer, AutoConfig):
        load = cls.from_pretrained

        def spy(*args, _load=load, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs.get("trust_remote_code", False)))
            return _load(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    args = ["--config", str(trained["config"]), *(["--model.trust_remote_code", "true"] if trust else [])]
    cli = tool_cli(PearCLI, args, "test", "test")
    cli.model.configure_model()
    cli.datamodule.load_tokenizer()
    hp = cli.model.hparams
    config = AutoConfig.from_pretrained(hp.model_name_or_path, trust_remote_code=hp.trust_remote_code)
    describe_inputs(cli.datamodule, {}, hp.model_name_or_path, config, "32-true", None)
    assert {name for name, _ in calls} == {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"}
    assert {trusted for _, trusted in calls} == {trust}
