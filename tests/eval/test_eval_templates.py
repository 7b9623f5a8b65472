"""Prompt templates: chat rendering, plain fallback, registry, stop tokens."""

from __future__ import annotations

import pytest
from eval_test_helpers import char_tokenizer

from eval import templates


def test_qwen_math_boxed_through_chat_template():
    tok = char_tokenizer(chat=True)
    tpl = templates.get("qwen-math-boxed")
    text = tpl.render("What is 1+1?", tok)
    assert text == (
        "<|im_start|>user\nWhat is 1+1?\nPlease reason step by step, and put your final answer "
        "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tpl.encode("What is 1+1?", tok)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # no BOS added on top of the template
    assert tok.decode(ids) == text
    assert tpl.stop_token_ids(tok) == (tok.convert_tokens_to_ids("<|im_end|>"),)


def test_qwen_math_boxed_plain_fallback_without_chat_template():
    tok = char_tokenizer(chat=False)
    tpl = templates.get("qwen-math-boxed")
    assert tpl.render("P", tok) == "P\nPlease reason step by step, and put your final answer within \\boxed{}."
    ids = tpl.encode("P", tok)
    assert ids[0] == tok.bos_token_id  # plain text: the tokenizer's own specials (BOS) are added
    assert tpl.stop_token_ids(tok) == ()


def test_plain_and_registered_callable():
    tok = char_tokenizer()
    assert templates.get("plain").render("76+6*2-1", tok) == "76+6*2-1\n"
    templates.register("toy_arith", lambda p: f"{p}=")
    tpl = templates.get("toy_arith")
    assert tpl.name == "toy_arith" and not tpl.use_chat_template
    assert tok.decode(tpl.encode("1+2", tok), skip_special_tokens=True) == "1+2="
    assert "toy_arith" in templates.available()


def test_unknown_and_bad_templates():
    with pytest.raises(ValueError, match="unknown prompt template 'nope'; registered:"):
        templates.get("nope")
    with pytest.raises(TypeError):
        templates.register("bad", 42)
