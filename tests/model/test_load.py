"""Loading the model: a folder that is missing, unreadable or needs remote code, and a checkpoint of another model or
setup, are refused in one line before anything trains or is written; QLoRA and gradient checkpointing load as asked."""

import importlib.util
import json
import shutil
import warnings

import lightning as L
import pytest
import torch
from conftest import GOOD, assert_refused, fit_args, run_cli, save_tiny_llama, write_jsonl

from pear_lightning import PearModule
from pear_lightning.errors import PearError
from pear_lightning.model.load import load_model
from pear_lightning.model.lora import LoraSettings


def spoil_model(model, how):
    """Break a copy of a model folder the way ``how`` says."""
    if how == "config-not-json":
        (model / "config.json").write_text("{not json")
    elif how == "weights-missing":
        (model / "model.safetensors").unlink()
    else:
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("no-such-folder", "model.model_name_or_path='{model}': no such folder"),
        (
            "config-not-json",
            "data.tokenizer_name_or_path='{model}': cannot load a tokenizer: It looks like the config file at "
            "'{model}/config.json' is not a valid JSON file.",
        ),
        ("weights-missing", "model.model_name_or_path='{model}': cannot load a causal LM: Error no file named "),
        ("weights-cut-short", "model.model_name_or_path='{model}': cannot load a causal LM: Error while deserializing"),
    ],
    ids=["no-such-folder", "config-not-json", "weights-missing", "weights-cut-short"],
)
def test_an_unreadable_model_folder_is_one_error(run_dir, tiny_model_dir, capsys, how, expected):
    model = run_dir / "model"
    if how != "no-such-folder":
        shutil.copytree(tiny_model_dir, model)
        spoil_model(model, how)
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    code, _, err = run_cli(fit_args(run_dir, model, path), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("error: " + expected.format(model=model))  # the rest is the library's own words
    assert not list(run_dir.glob("**/*.ckpt"))


def test_a_local_model_path_with_a_typo_is_refused_without_asking_the_hub(run_dir, tiny_model_dir, capsys, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for a local path")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    shutil.copytree(tiny_model_dir, run_dir / "models" / "tiny")
    typo = "models/tiyn"  # a hub name has this shape too; `models/` is a local folder, so it is a path
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    monkeypatch.chdir(run_dir)
    assert_refused(fit_args(run_dir, typo, path), capsys, run_dir, f"model.model_name_or_path='{typo}': no such folder")


def test_a_model_that_needs_trust_remote_code_is_refused_while_it_is_off(run_dir, tiny_model_dir, capsys):
    model = run_dir / "custom-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "custom"  # not a built-in architecture: only the folder's code can build it
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_x.py").write_text("raise RuntimeError('remote code ran')\n")
    (model / "modeling_x.py").write_text("raise RuntimeError('remote code ran')\n")
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    assert_refused(
        fit_args(run_dir, model, path),
        capsys,
        run_dir,
        f"model.model_name_or_path='{model}': a causal LM needs code from its folder or repository (auto_map in its "
        "config), and model.trust_remote_code is false; set it to true if you trust that code",
    )


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory, tokenizer):
    """A checkpoint of another model: a one-layer Llama where the tiny model has two."""
    root = tmp_path_factory.mktemp("other-model")
    save_tiny_llama(root / "model", tokenizer, num_hidden_layers=1)
    module = PearModule(str(root / "model"))
    module.configure_model()
    path = root / "other.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": L.__version__}, path)
    return path


def another_model(model):
    return (
        f"the checkpoint was not made by this model and setup ({model}, lora=off): 9 weights missing, 0 unexpected, "
        "0 of another shape (first: ['model.model.layers.1.input_layernorm.weight', "
        "'model.model.layers.1.mlp.down_proj.weight', 'model.model.layers.1.mlp.gate_proj.weight']); "
        "resume with the config that made it"
    )


def test_resuming_from_a_checkpoint_of_another_model_is_refused(run_dir, tiny_model_dir, capsys, other_checkpoint):
    before = other_checkpoint.read_bytes()
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    args = fit_args(run_dir, tiny_model_dir, path, "--ckpt_path", str(other_checkpoint))
    assert_refused(args, capsys, run_dir, another_model(tiny_model_dir))
    assert other_checkpoint.read_bytes() == before


def test_exporting_a_checkpoint_of_another_model_writes_nothing(run_dir, tiny_model_dir, capsys, other_checkpoint):
    path = write_jsonl(run_dir / "train.jsonl", GOOD)
    output = run_dir / "exported"
    args = ["export", *fit_args(run_dir, tiny_model_dir, path)[1:]]
    args += ["--checkpoint", str(other_checkpoint), "--output", str(output)]
    assert_refused(args, capsys, run_dir, another_model(tiny_model_dir))
    assert not output.exists() and not list(run_dir.glob(".exported*"))


def test_qlora_without_a_gpu_or_without_lora_is_a_clear_error(tiny_model_dir):
    with pytest.raises(PearError, match=r"^model.load_in_4bit is QLoRA: it needs model.lora"):
        PearModule(str(tiny_model_dir), load_in_4bit=True).configure_model()
    if not torch.cuda.is_available():
        lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
        with pytest.raises(PearError, match=r"^model.load_in_4bit needs a CUDA GPU and bitsandbytes"):
            PearModule(str(tiny_model_dir), load_in_4bit=True, lora=lora).configure_model()


def test_gradient_checkpointing_uses_the_current_transformers_call(tiny_model_dir):
    """transformers 5 deprecates ``gradient_checkpointing_enable``; the model is checkpointed without that warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_model(str(tiny_model_dir), gradient_checkpointing=True)
    assert model.is_gradient_checkpointing
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_an_attention_implementation_whose_package_is_missing_is_one_error(tiny_model_dir):
    with pytest.raises(PearError) as refused:
        load_model(str(tiny_model_dir), attn_implementation="flash_attention_2")
    message = str(refused.value)
    assert message.startswith(f"model.attn_implementation=flash_attention_2: loading {tiny_model_dir} needs a package")
    assert message.endswith(
        "; install it, or choose settings that do not need it (model.attn_implementation sdpa or pear_varlen)"
    )
