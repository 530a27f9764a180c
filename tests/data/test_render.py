"""Rendering an example to token ids and a loss mask: the mask is found by token position (exactly the assistant
tokens and their end-of-turn token), a generator's sampled ids are trained as sampled, and a row of the wrong shape
is refused in one line naming its file, row and id."""

import pytest
from conftest import GOOD, STUDENT, assert_refused, conversation, demo_rows, fit_args, write_jsonl
from transformers import AutoTokenizer

from pear_lightning.data.render import example_id, tokenize_example
from pear_lightning.errors import PearError


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
            "data.jsonl row 3 (id q): needs `messages` (chat) or `prompt` + `completion` (strings), or a prompt with its generator's `token_ids`; found fields ['text']",
        ),
        (
            {"prompt": "hi"},
            "data.jsonl row 3 (id q): needs `messages` (chat) or `prompt` + `completion` (strings), or a prompt with its generator's `token_ids`; found fields ['prompt']",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            "data.jsonl row 3 (id q): `messages` has no assistant turn to train on, and no generator `token_ids`",
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


def spelled_out(text, tokenizer) -> list[int]:
    """``text`` as one token per character: ids a sampler can draw, which re-tokenising the text merges."""
    return tokenizer.convert_tokens_to_ids(["Ġ" if c == " " else c for c in text])


def test_generator_ids_are_trained_as_sampled_when_the_text_retokenises_differently(tokenizer):
    text = "Start with 1+2=3. #### 3"
    ids = spelled_out(text, tokenizer) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    example = {"messages": conversation("Compute 1+2.", text)}
    retokenised = tokenize_example(example, tokenizer, 256, "x")
    assert [t for t, m in zip(retokenised["input_ids"], retokenised["loss_mask"]) if m] != ids  # the premise
    tokens = tokenize_example(example, tokenizer, 256, "x", response_ids=ids)
    prompt = tokenizer.apply_chat_template(conversation("Compute 1+2.", "")[:1], add_generation_prompt=True)
    assert tokens["input_ids"] == prompt["input_ids"] + ids + tokenizer("\n")["input_ids"]
    assert [t for t, m in zip(tokens["input_ids"], tokens["loss_mask"]) if m] == ids
    assert tokens["prompt_length"] == len(prompt["input_ids"]) and tokens["generated"]


def test_the_demo_data_renders_the_same_from_its_ids_as_from_its_text(tokenizer):
    """The shipped data's sampled ids re-tokenise to themselves, so passing them through changes nothing."""
    keys = ("input_ids", "loss_mask", "num_loss_tokens", "prompt_length", "truncated")
    for row in demo_rows(split="val") + demo_rows(300):
        text = tokenize_example(row, tokenizer, 128, row["id"])
        ids = tokenize_example(row, tokenizer, 128, row["id"], response_ids=row["token_ids"])
        assert {k: text[k] for k in keys} == {k: ids[k] for k in keys}, row["id"]
        assert ids["generated"] and not ids["end_of_turn_added"] and not ids["unfinished"]


def test_every_prompt_form_gives_the_same_tokens(tokenizer):
    ids = spelled_out("#### 3", tokenizer) + [tokenizer.eos_token_id]
    forms = [
        {"prompt": "Compute 1+2."},
        {"prompt": "Compute 1+2.", "completion": "anything: the text is not used"},
        {"messages": [{"role": "user", "content": "Compute 1+2."}]},
        {"messages": conversation("Compute 1+2.", "anything")},
    ]
    first, *rest = (tokenize_example(f, tokenizer, 256, "x", response_ids=ids) for f in forms)
    assert all(other == first for other in rest)


def test_the_end_of_turn_token_is_added_only_when_the_sampler_stopped_on_it(tokenizer):
    end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer("\n")["input_ids"]
    ids = spelled_out("#### 3", tokenizer)
    example = {"prompt": "Compute 1+2."}
    closed = tokenize_example(example, tokenizer, 256, "x", response_ids=ids + [end])
    stopped = tokenize_example(example, tokenizer, 256, "x", response_ids=ids, finish_reason="stop")
    cut = tokenize_example(example, tokenizer, 256, "x", response_ids=ids, finish_reason="length")
    assert stopped["input_ids"] == closed["input_ids"] and stopped["loss_mask"] == closed["loss_mask"]
    assert closed["input_ids"][-2:] == [end, *newline] and closed["loss_mask"][-2:] == [True, False]
    assert stopped["end_of_turn_added"] and not closed["end_of_turn_added"]
    assert cut["input_ids"] == closed["input_ids"][:-2] and cut["unfinished"] and all(cut["loss_mask"][-len(ids) :])
    again = tokenize_example(example, tokenizer, 256, "x", response_ids=ids + [end], finish_reason="stop")
    assert again["input_ids"] == closed["input_ids"]  # never added twice
    other = tokenizer.convert_tokens_to_ids("<|endoftext|>")  # a stop token that is not the template's end of turn
    elsewhere = tokenize_example(example, tokenizer, 256, "x", response_ids=ids + [other], finish_reason="stop")
    assert elsewhere["input_ids"][-len(ids) - 1 :] == ids + [other] and all(elsewhere["loss_mask"][-len(ids) - 1 :])
    assert not elsewhere["end_of_turn_added"] and not elsewhere["unfinished"]


def test_ids_of_one_turn_cannot_stand_for_several_assistant_turns(tokenizer):
    messages = conversation("Compute 1+1.", "#### 2") + conversation("And 2+2?", "#### 4")
    ids = spelled_out("#### 4", tokenizer)
    tokens = tokenize_example({"messages": messages}, tokenizer, 256, "x", response_ids=ids)
    assert not tokens["generated"]  # rendered from text; the join then compares the ids with every turn's tokens
    assert trained_text(tokens, tokenizer) == "#### 2<|im_end|>#### 4<|im_end|>"
    asked = tokenize_example({"messages": messages[:3]}, tokenizer, 256, "x", response_ids=ids)
    assert asked["generated"] and trained_text(asked, tokenizer) == "#### 4"  # a conversation ending in a question


def test_without_chat_template_generated_ids_follow_the_plain_prompt(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    plain = AutoTokenizer.from_pretrained(tmp_path)
    plain.chat_template = None
    ids = spelled_out(" #### 3", plain)
    tokens = tokenize_example({"prompt": "Compute 1+2."}, plain, 256, "x", response_ids=ids, finish_reason="stop")
    assert tokens["input_ids"] == plain("Compute 1+2.")["input_ids"] + ids + [plain.eos_token_id]
    assert trained_text(tokens, plain) == " #### 3<|im_end|>"


def test_a_conversation_that_starts_with_the_assistant_trains_on_its_content_only(tokenizer):
    example = {"messages": [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Hi"}]}
    tokens = tokenize_example(example, tokenizer, 256, "row 1")
    assert trained_text(tokens, tokenizer) == "Hello.<|im_end|>"


def test_a_response_token_at_position_zero_is_not_trained_on(tokenizer):
    no_template = tokenizer.__class__.from_pretrained(STUDENT)
    no_template.chat_template = None
    tokens = tokenize_example({"prompt": "", "completion": "7+5=12."}, no_template, 64, "row 1")
    assert tokens["untrainable_first"] and not tokens["loss_mask"][0]
    assert tokens["num_loss_tokens"] == len(tokens["input_ids"]) - 1  # the rest and the EOS


# Rows of the wrong shape, as `fit` meets them: one error line naming the file, the row and its id.


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"prompt": 5}, "row 2 (id g1): `prompt` and `completion` must be strings, but `prompt` is int"),
        (
            {"messages": "hello", "prompt": None, "completion": None},
            "row 2 (id g1): `messages` must be a list of {'role': str, 'content': str}",
        ),
    ],
    ids=["prompt-is-a-number", "messages-is-a-string"],
)
def test_a_text_column_of_the_wrong_type_is_named_with_its_row(run_dir, tiny_model_dir, capsys, change, problem):
    rows = [dict(r) for r in GOOD]
    rows[1].update(change)
    path = write_jsonl(run_dir / "train.jsonl", rows)
    args = fit_args(run_dir, tiny_model_dir, path, "--model.weighting", "UniformSFT")
    assert_refused(args, capsys, run_dir, f"{path} {problem}")


def test_a_row_without_messages_or_prompt_is_named_by_file_and_row(run_dir, tiny_model_dir, capsys):
    bad = write_jsonl(
        run_dir / "bad.jsonl", [{"id": "ok", "prompt": "a", "completion": "b"}, {"id": "x7", "text": "c"}]
    )
    expected = f"{bad} row 2 (id x7): needs `messages` (chat) or `prompt` + `completion` (strings), or a prompt with its generator's `token_ids`; found fields ['id', 'text']"
    assert_refused(fit_args(run_dir, tiny_model_dir, bad), capsys, run_dir, expected)


def test_a_row_with_messages_and_prompt_is_refused(run_dir, tiny_model_dir, capsys):
    rows = [dict(r) for r in GOOD]
    rows[2]["messages"] = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = write_jsonl(run_dir / "train.jsonl", rows)
    expected = (
        f"{path} row 3 (id g2): has both `messages` and `prompt` and `completion`; an example is one or the other: "
        "keep one form per row"
    )
    assert_refused(fit_args(run_dir, tiny_model_dir, path), capsys, run_dir, expected)
