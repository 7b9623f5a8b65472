"""Shared by tests/eval: a tiny character tokenizer (optionally with a chat template) and a fake engine."""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch

from r3.engines.base import RolloutSample, SamplingParams

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(*, chat: bool = False, bos: bool = True):
    """A transformers tokenizer: one token per printable character, specials kept whole."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<\|im_start\|>|<\|im_end\|>|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat:
        t.chat_template = CHAT_TEMPLATE
    return t


class FakeEngine:
    """A RolloutEngine that answers from a table: for the j-th occurrence of a problem's prompt in one
    call, it answers correctly iff j < n_correct[problem]; the response text carries the call seed, so
    reproducibility with seeds is observable. `fail_after` calls raise (a crash mid-evaluation)."""

    def __init__(self, tokenizer, answers: dict[str, tuple[str, int]], *, fail_after: int | None = None):
        self.tok = tokenizer
        self.answers = answers  # problem text -> (gold, n_correct)
        self.calls = 0
        self.prompts_seen = 0
        self.fail_after = fail_after

    def _problem_of(self, prompt_ids: Sequence[int]) -> str:
        text = self.tok.decode(prompt_ids, skip_special_tokens=True)
        hits = [p for p in self.answers if p in text]
        assert len(hits) == 1, (text, hits)
        return hits[0]

    def generate(self, prompts, params: SamplingParams, *, capture_routing: bool = False):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.prompts_seen += len(prompts)
        seen: dict[str, int] = {}
        out = []
        for p in prompts:
            prob = self._problem_of(p)
            j = seen[prob] = seen.get(prob, -1) + 1
            gold, n_ok = self.answers[prob]
            ans = gold if j < n_ok else f"{gold}1"
            text = f"seed {params.seed} try {j}: \\boxed{{{ans}}}"
            ids = self.tok(text, add_special_tokens=False)["input_ids"][: params.max_new_tokens]
            ids = ids + [self.tok.eos_token_id]
            out.append(
                RolloutSample(
                    prompt_ids=list(p), response_ids=ids, logprobs_R=torch.zeros(len(ids)), finish_reason="stop"
                )
            )
        return out

    def sync_weights(self, state_dict) -> None:  # pragma: no cover - protocol completeness
        pass
