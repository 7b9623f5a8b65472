"""Prompt templates: problem text -> prompt token ids. The template name goes into every record.

Built-ins:
- `qwen-math-boxed`: the Qwen math instruction "Please reason step by step, and put your final
  answer within \\boxed{}." after the problem, as the user turn of the model's chat template
  (`apply_chat_template(..., add_generation_prompt=True)`, as the Qwen2.5-Math / QwQ evaluation
  scripts do); a tokenizer without a chat template gets the same text as plain text.
- `plain`: the problem text and a newline, no chat template (the embedded model's format).
Other packages add theirs with `register(name, template)`; a plain callable `problem -> text` is
accepted and treated as a non-chat template (the embedded task registers `arith` this way).

Encoding: chat-rendered text already holds its special tokens, so it is tokenised with
add_special_tokens=False; plain text with add_special_tokens=True, so a tokenizer whose
post-processor prepends BOS (the embedded character tokenizer) gets it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

QWEN_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_CHAT_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTemplate:
    """How a problem becomes a prompt."""

    name: str
    format: Callable[[str], str]
    """problem -> text of the user turn (chat) or of the whole prompt (plain)."""
    use_chat_template: bool = False
    """Render through the tokenizer's chat template when it has one."""

    def uses_chat(self, tokenizer: Any) -> bool:
        return self.use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    def render(self, problem: str, tokenizer: Any) -> str:
        """The prompt text."""
        text = self.format(problem)
        if self.uses_chat(tokenizer):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        return text

    def encode(self, problem: str, tokenizer: Any) -> list[int]:
        """Prompt token ids."""
        ids = tokenizer(self.render(problem, tokenizer), add_special_tokens=not self.uses_chat(tokenizer))["input_ids"]
        if not ids:
            raise ValueError(f"template {self.name!r} encoded problem {problem[:60]!r} to zero tokens")
        return list(ids)

    def stop_token_ids(self, tokenizer: Any) -> tuple[int, ...]:
        """Extra stop tokens: the chat end-of-turn markers the vocabulary has (EOS is implicit)."""
        if not self.uses_chat(tokenizer):
            return ()
        vocab = tokenizer.get_vocab()
        return tuple(vocab[t] for t in _CHAT_END_TOKENS if t in vocab)


_REGISTRY: dict[str, PromptTemplate] = {
    "qwen-math-boxed": PromptTemplate(
        name="qwen-math-boxed", format=lambda p: f"{p}\n{QWEN_MATH_INSTRUCTION}", use_chat_template=True
    ),
    "plain": PromptTemplate(name="plain", format=lambda p: f"{p}\n"),
}


def register(name: str, template: PromptTemplate | Callable[[str], str]) -> None:
    """Add or replace a template; a callable `problem -> text` becomes a plain (non-chat) one."""
    if isinstance(template, PromptTemplate):
        tpl = dataclasses.replace(template, name=name)
    elif callable(template):
        tpl = PromptTemplate(name=name, format=template)
    else:
        raise TypeError(f"template {name!r} must be a PromptTemplate or a callable, got {type(template).__name__}")
    _REGISTRY[name] = tpl


def get(name: str) -> PromptTemplate:
    if name not in _REGISTRY:
        raise ValueError(f"unknown prompt template {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available() -> list[str]:
    return sorted(_REGISTRY)
