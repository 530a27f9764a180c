"""Loss masks are found by token position: exactly the assistant tokens and their end-of-turn token."""

import pytest
from conftest import conversation
from transformers import AutoTokenizer

from pear_lightning.errors import PearError
from pear_lightning.render import example_id, tokenize_example


def trained_text(tokens, tokenizer) -> str:
    return tokenizer.decode([t for t, m in zip(tokens["input_ids"], tokens["loss_mask"]) if m])


def test_chat_mask_is_the_assistant_turn_and_its_end_token(tokenizer):
    tokens = tokenize_example({"messages": conversation("Compute 1+2.", "1+2=3. #### 3")}, tokenizer, 256, "x")
    assert trained_text(tokens, tokenizer) == "1+2=3. #### 3<|im_end|>"
    prompt = tokenizer.apply_chat_template(conversation("Compute 1+2.", "")[:1], add_generation_prompt=True)
    assert tokens["prompt_length"] == len(prompt["input_ids"])
    assert not any(tokens["loss_mask"][: tokens["prompt_length"]])
    assert tokens["loss_mask"][-1] is False  # the template's newline after <|im_end|> is not a response token


def test_chat_and_prompt_completion_give_the_same_tokens_and_mask(tokenizer):
    chat = tokenize_example({"messages": conversation("Compute 4-1.", "4-1=3. #### 3")}, tokenizer, 256, "a")
    pair = tokenize_example({"prompt": "Compute 4-1.", "completion": "4-1=3. #### 3"}, tokenizer, 256, "b")
    assert chat == pair


def test_multi_turn_trains_on_every_assistant_turn_and_nothing_else(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Compute 1+1."},
        {"role": "assistant", "content": "#### 2"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "#### 4"},
    ]
    tokens = tokenize_example({"messages": messages}, tokenizer, 256, "x")
    assert trained_text(tokens, tokenizer) == "#### 2<|im_end|>#### 4<|im_end|>"
    prompt = tokenizer.apply_chat_template(messages[:4], add_generation_prompt=True)["input_ids"]
    assert tokens["prompt_length"] == len(prompt)


def test_without_chat_template_prompt_completion_is_plain_text_plus_eos(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    plain.chat_template = None
    tokens = tokenize_example({"prompt": "Compute 1+2.", "completion": " #### 3"}, plain, 256, "x")
    assert plain.decode(tokens["input_ids"]) == "Compute 1+2. #### 3<|im_end|>"
    assert trained_text(tokens, plain) == " #### 3<|im_end|>"
    # A token straddling the prompt/completion boundary is trained on, so every completion character is.
    straddling = tokenize_example({"prompt": "Compute 1+2. ", "completion": "#### 3"}, plain, 256, "x")
    assert trained_text(straddling, plain) == " #### 3<|im_end|>"
    with pytest.raises(PearError, match=r"^x: chat `messages` need a tokenizer with a chat template"):
        tokenize_example({"messages": conversation("a", "b")}, plain, 256, "x")


def test_truncation_keeps_the_start_and_is_reported(tokenizer):
    full = tokenize_example({"prompt": "Compute 1+2.", "completion": "1+2=3. #### 3"}, tokenizer, 256, "x")
    cut = tokenize_example({"prompt": "Compute 1+2.", "completion": "1+2=3. #### 3"}, tokenizer, 20, "x")
    assert cut["truncated"] and not full["truncated"]
    assert cut["input_ids"] == full["input_ids"][:20] and cut["loss_mask"] == full["loss_mask"][:20]


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (
            {"text": "hi"},
            "data.jsonl row 3 (id q): needs `messages` (chat) or `prompt` + `completion` (strings); found fields ['text']",
        ),
        (
            {"prompt": "hi"},
            "data.jsonl row 3 (id q): needs `messages` (chat) or `prompt` + `completion` (strings); found fields ['prompt']",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "data.jsonl row 3 (id q): `messages` has no assistant turn to train on",
        ),
        (
            {"messages": [{"role": "user"}]},
            "data.jsonl row 3 (id q): `messages` must be a list of {'role': str, 'content': str}",
        ),
    ],
)
def test_malformed_rows_name_the_file_row_and_id(tokenizer, example, message):
    with pytest.raises(PearError) as err:
        tokenize_example(example, tokenizer, 64, "data.jsonl row 3 (id q)")
    assert str(err.value) == message


def test_ids_are_given_or_a_stable_content_hash():
    assert example_id({"id": 7, "prompt": "a", "completion": "b"}) == "7"
    hashed = example_id({"prompt": "a", "completion": "b"})
    assert hashed == example_id({"completion": "b", "prompt": "a", "id": None})
    assert hashed != example_id({"prompt": "a", "completion": "c"}) and len(hashed) == 16
