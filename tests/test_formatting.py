"""Loss masking on real tokenizers: exactly the answer + end-of-turn token carry labels."""

import pytest

from newsray.formatting import IGNORE_INDEX, Formatter, build_prompt, pad_batch

ANSWER = '{\n  "relevance_score": 9,\n  "summary": "",\n  "key_insights": [\n    "AI Model"\n  ],\n  "company_names": [\n    "Google"\n  ]\n}'
MESSAGES = [{"role": "user", "content": "Analyze this newsletter item:\n\nTitle: **Genie 2**\nContent: DeepMind's world model."}]


@pytest.fixture(params=["smollm2", "llama3"])
def case(request, smollm2_tokenizer, llama3_tokenizer):
    tok = smollm2_tokenizer if request.param == "smollm2" else llama3_tokenizer
    eot = "<|im_end|>" if request.param == "smollm2" else "<|eot_id|>"
    return request.param, tok, eot


def labelled(row):
    return [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]


def test_labels_decode_to_exactly_answer_plus_end_of_turn(case):
    _, tok, eot = case
    fmt = Formatter.for_tokenizer(tok, max_seq_length=2048)
    assert fmt.eot_token == eot
    row = fmt.example(MESSAGES, ANSWER)
    assert tok.decode(labelled(row), skip_special_tokens=False) == ANSWER + eot
    # labels are the inputs where they are set, and the labelled span is one contiguous suffix
    first = next(i for i, lab in enumerate(row["labels"]) if lab != IGNORE_INDEX)
    assert row["labels"][first:] == row["input_ids"][first:]
    assert all(lab == IGNORE_INDEX for lab in row["labels"][:first])
    assert row["input_ids"][-1] == tok.convert_tokens_to_ids(eot)


def test_inference_prompt_is_the_training_prefix_byte_for_byte(case):
    _, tok, _ = case
    fmt = Formatter.for_tokenizer(tok, max_seq_length=2048)
    row = fmt.example(MESSAGES, ANSWER)
    n_prompt = row["labels"].index(next(lab for lab in row["labels"] if lab != IGNORE_INDEX))
    prompt_text = build_prompt(tok, MESSAGES)
    assert row["input_ids"][:n_prompt] == fmt.prompt_ids(MESSAGES)
    assert tok.decode(row["input_ids"][:n_prompt], skip_special_tokens=False) == prompt_text
    # ... and the template itself renders the conversation as prompt + answer + end-of-turn
    assert fmt.training_text(MESSAGES, ANSWER).startswith(prompt_text + ANSWER + fmt.eot_token)


def test_template_specifics(smollm2_tokenizer, llama3_tokenizer):
    s = build_prompt(smollm2_tokenizer, MESSAGES)
    assert s.startswith("<|im_start|>system\n") and s.endswith("<|im_start|>assistant\n")
    ll = build_prompt(llama3_tokenizer, MESSAGES)
    assert ll.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert ll.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Today Date: 26 Jul 2024" in ll  # fixed: the prompt must not change with the calendar
    assert len(llama3_tokenizer) == 128256 or len(llama3_tokenizer.get_vocab()) >= 128256
    # exactly one BOS: the template carries it, the tokenizer must not add a second
    ids = Formatter.for_tokenizer(llama3_tokenizer, 2048).prompt_ids(MESSAGES)
    assert ids.count(llama3_tokenizer.bos_token_id) == 1 and ids[0] == llama3_tokenizer.bos_token_id


def test_pad_equal_to_eos_does_not_mask_the_stop_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")  # the trap
    fmt = Formatter.for_tokenizer(tok, max_seq_length=2048)
    rows = [fmt.example(MESSAGES, ANSWER), fmt.example(MESSAGES, '{"relevance_score": 1}')]
    batch = pad_batch(rows, pad_id=tok.pad_token_id)
    short = batch["labels"][1]
    n = len(rows[1]["input_ids"])
    assert short[n - 1] == tok.eos_token_id           # the stop token keeps its label
    assert all(lab == IGNORE_INDEX for lab in short[n:])  # padding carries none
    assert batch["attention_mask"][1][n:] == [0] * (len(short) - n)
    left = pad_batch(rows, pad_id=tok.pad_token_id, side="left")
    assert left["input_ids"][1][-n:] == rows[1]["input_ids"]


def test_stop_ids_and_too_long_examples(llama3_tokenizer):
    fmt = Formatter.for_tokenizer(llama3_tokenizer, max_seq_length=2048)
    eot, eos = llama3_tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert fmt.stop_token_ids() == [eot, eos]
    assert Formatter.for_tokenizer(llama3_tokenizer, max_seq_length=16).example(MESSAGES, ANSWER) is None


def test_news_examples_fit_the_cpu_recipe(smollm2_tokenizer, data_dir):
    from newsray.config import load_config
    from newsray.tasks import get_task

    cfg = load_config(None, [f"data.root={data_dir}"])
    fmt = Formatter.for_tokenizer(smollm2_tokenizer, max_seq_length=1024)
    splits = get_task(cfg).load()
    rows = [fmt.example(e.messages(), e.answer) for e in splits.train + splits.test]
    assert all(r is not None for r in rows)
    assert max(len(r["input_ids"]) for r in rows) < 1024
