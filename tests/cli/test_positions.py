"""Sequences longer than the model's positions are refused before the first step or sample, by every command that
reads data or samples, with one line naming both numbers: a model with learned positions (GPT-2) would crash mid-run,
a RoPE model (Llama) would run past the context it was trained on."""

import pytest
from conftest import assert_refused, conversation, fit_args, save_tiny_llama, write_jsonl
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

LIMIT = 48
LONG = {"id": "long", "messages": conversation("Compute " + "+".join("12345"), "#### " + " 1" * 40)}  # ~70 tokens
SHORT = {"id": "short", "messages": conversation("Compute 1+1.", "#### 2")}


@pytest.fixture(scope="module", params=["learned", "rope"])
def short_model(request, tmp_path_factory, tokenizer):
    """A tiny model of ``LIMIT`` positions: GPT-2's learned position embeddings, or Llama's RoPE."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "rope":
        save_tiny_llama(folder, tokenizer)
        config = AutoConfig.from_pretrained(folder)
        config.max_position_embeddings = LIMIT
        config.save_pretrained(folder)
        return folder, "max_position_embeddings"
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=LIMIT, n_embd=32, n_layer=2, n_head=4)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, "max_position_embeddings"  # GPT-2 maps it to n_positions


def expected(what: str, tokens: int, model, field: str, fix: str) -> str:
    return (
        f"{what} has {tokens} tokens, more than the {LIMIT} positions of model {model} (its config's {field}; a "
        f"model with learned positions fails past them, a RoPE model runs on positions it was never trained on): {fix}"
    )


def prompt_tokens(tokenizer, messages) -> int:
    return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def long_tokens(tokenizer) -> int:
    return len(tokenizer.apply_chat_template(LONG["messages"], tokenize=True, return_dict=True)["input_ids"])


@pytest.mark.parametrize("command", ["fit", "validate", "cache_logprobs", "inspect_logprobs"])
def test_data_longer_than_the_positions_is_refused_by_every_command(command, short_model, tokenizer, run_dir, capsys):
    model, field = short_model
    train = write_jsonl(run_dir / "train.jsonl", [SHORT, LONG])
    args = fit_args(run_dir, model, train, "--data.max_length", "128", "--data.val_path", str(train))
    args[0] = command
    if command == "cache_logprobs":
        args += ["--output", str(run_dir / "cache")]
    tokens = long_tokens(tokenizer)
    if command == "inspect_logprobs":  # the generator's ids are the trained response, as they are: 60 of them
        rows = [{**row, "token_ids": [7] * n, "logprobs": [-1.0] * n} for row, n in ((SHORT, 2), (LONG, 60))]
        train = write_jsonl(run_dir / "scored.jsonl", rows)
        args[args.index("--data.train_path") + 1] = str(train)
        tokens = prompt_tokens(tokenizer, LONG["messages"][:1]) + 60
    fix = "set data.max_length to at most 48 (longer examples are cut, and counted), or use a model with more"
    message = expected(f"example long of {train}", tokens, model, field, fix)
    assert_refused(args, capsys, run_dir, message)
    assert not (run_dir / "cache").exists()


def test_a_prompt_plus_max_new_tokens_past_the_positions_is_refused_before_sampling(
    short_model, tokenizer, run_dir, capsys
):
    model, field = short_model
    prompts = write_jsonl(run_dir / "prompts.jsonl", [{"id": "p", "messages": LONG["messages"][:1]}])
    prompt = prompt_tokens(tokenizer, LONG["messages"][:1])
    args = ["generate", "--model.model_name_or_path", str(model), "--trainer.accelerator", "cpu"]
    args += ["--prompts", str(prompts), "--output", str(run_dir / "gen"), "--max_new_tokens", "40"]
    what = f"prompt p of {prompts} ({prompt} tokens) + --max_new_tokens 40"
    assert_refused(
        args,
        capsys,
        run_dir,
        expected(what, prompt + 40, model, field, f"lower --max_new_tokens to at most {LIMIT - prompt}"),
    )
    assert not (run_dir / "gen").exists()
