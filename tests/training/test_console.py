"""What a run shows on the console: progress in optimizer steps with the loss a user knows, one parameter summary
line instead of a module table, and no avoidable warnings."""

import sys
import warnings

from conftest import adamw, demo_rows, fit_quietly, run_cli, write_jsonl

from pear_lightning import PearDataModule, PearModule


def test_the_demo_console_counts_optimizer_steps_and_warns_of_nothing(run_dir, monkeypatch, capsys, caplog):
    """The demo's console: `step N/total` with loss, nll and lr, one summary line, no epoch counter, no v_num, no
    Lightning module table, and no warning from Lightning, transformers or this package."""
    monkeypatch.setattr(sys, "argv", ["pear_lightning"])
    monkeypatch.chdir(run_dir)  # the packaged demo config writes runs/ where it is run
    args = ["fit", "--config", "demo", "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"]
    args += ["--trainer.callbacks.init_args.max_examples", "4", "--trainer.log_every_n_steps", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli(args, capsys)
    assert code == 0, err
    # Not a terminal: one plain progress line per logging step (tests/e2e/test_console_output.py: the live bar).
    progress = [line for line in out.splitlines() if line.startswith("step ") and "/" in line.split()[1]]
    assert [line.split()[1] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(f" {name} " in progress[-1] for name in ("loss", "nll", "lr", "tok/s", "val/loss"))
    assert "Epoch" not in out and "v_num" not in out and "Total params" not in out + err
    assert "model: LlamaForCausalLM, 472,128 parameters; training 472,128 (100.00%, all weights)" in caplog.text
    assert "step 0: val/accuracy" in out and "step 2: val/accuracy" in out
    ours = [w for w in caught if not str(w.filename).startswith(sys.prefix) or "lightning" in str(w.filename)]
    ours += [
        w
        for w in caught
        if issubclass(w.category, FutureWarning | DeprecationWarning) and "transformers" in str(w.filename)
    ]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]


def test_the_summary_counts_parameters_and_the_lora_share(tmp_path, tiny_model_dir, caplog):
    """One line: every parameter of the model, the trainable ones, and with LoRA the adapters' share."""
    from pear_lightning.model.lora import LoraSettings
    from pear_lightning.training.console import ParameterSummary

    train = write_jsonl(tmp_path / "train.jsonl", demo_rows(4))
    data = PearDataModule(str(train), tokenizer_name_or_path=str(tiny_model_dir), batch_size=2, max_length=96)
    module = PearModule(str(tiny_model_dir), lora=LoraSettings(r=2, target_modules=["q_proj"]), optimizer=adamw(1e-3))
    with caplog.at_level("INFO"):
        fit_quietly(module, data, max_steps=1, callbacks=[ParameterSummary()])
    params = list(module.model.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    assert 0 < trainable < total
    line = f"model: PeftModelForCausalLM (LlamaForCausalLM), {total:,} parameters; training {trainable:,} ({trainable / total:.2%}, LoRA adapters)"
    assert line in caplog.text
