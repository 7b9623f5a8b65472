"""Trainer weights -> a checkpoint directory vLLM can load (light: torch + safetensors only).

The trainer's state dict uses transformers' in-memory Qwen3-MoE names, where each MoE layer's
experts are fused 3-D tensors (transformers >= 5, modeling_qwen3_moe.Qwen3MoeExperts):
    model.layers.{i}.mlp.experts.gate_up_proj  [E, 2I, H]  (rows 0..I-1 gate, I..2I-1 up: forward does
                                                            linear(x, gate_up_proj[e]).chunk(2, dim=-1))
    model.layers.{i}.mlp.experts.down_proj     [E, H, I]
The checkpoint on disk uses the per-expert names of the HF Qwen3-MoE checkpoints (what
`save_pretrained` writes and vLLM's Qwen3MoeForCausalLM.load_weights maps onto its fused w13/w2):
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight [I, H], .up_proj.weight [I, H], .down_proj.weight [H, I]
Everything else keeps its name. A tied lm_head (tie_word_embeddings) is dropped, as save_pretrained does.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
_SIDE_FILES = (".json", ".txt", ".model", ".jinja")
"""Files copied beside the weights (config, generation config, tokenizer); index files are not."""


def to_checkpoint_names(
    state_dict: Mapping[str, torch.Tensor], *, tie_word_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors (contiguous, CPU) from a transformers in-memory state dict (the
    name mapping is the SGLang client's, r3.engines.sglang.to_checkpoint_names); a tied lm_head is
    dropped. Already per-expert names pass through unchanged."""
    from r3.engines.sglang import to_checkpoint_names as names  # light module: urllib + torch

    sd = {k: v for k, v in state_dict.items() if not (tie_word_embeddings and k == "lm_head.weight")}
    return {k: v.detach().to("cpu").contiguous() for k, v in names(sd).items()}


def write_checkpoint(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    base_model_path: str | Path,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write `state_dict` (transformers names) as <out_dir>/model.safetensors in checkpoint names, with
    the base model's config/tokenizer files beside it. Written to a temporary name first and renamed,
    so a reader never sees half a file."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(base_model_path).iterdir():
        if f.is_file() and f.suffix in _SIDE_FILES and "index" not in f.name:
            shutil.copy2(f, out / f.name)
    tensors = to_checkpoint_names(state_dict, tie_word_embeddings=tie_word_embeddings)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)
    return out
