"""Trainer weights -> a transformers checkpoint directory that inference servers load (light: torch
+ safetensors), shared by every engine that syncs weights through disk (vLLM, SGLang) and by the
megatron engine's export.

The trainer's state dict uses transformers' in-memory Qwen3-MoE names, where each MoE layer's
experts are fused 3-D tensors (transformers >= 5, modeling_qwen3_moe.Qwen3MoeExperts):
    model.layers.{i}.mlp.experts.gate_up_proj  [E, 2I, H]  (rows 0..I-1 gate, I..2I-1 up: forward does
                                                            linear(x, gate_up_proj[e]).chunk(2, dim=-1))
    model.layers.{i}.mlp.experts.down_proj     [E, H, I]
The checkpoint on disk uses the per-expert names of the HF Qwen3-MoE checkpoints (what
`save_pretrained` writes, what vLLM's Qwen3MoeForCausalLM.load_weights and SGLang's loaders map onto
their fused w13/w2; the fused in-memory names are skipped by those loaders without a word):
    model.layers.{i}.mlp.experts.{e}.gate_proj.weight [I, H], .up_proj.weight [I, H], .down_proj.weight [H, I]
Everything else keeps its name. A tied lm_head (tie_word_embeddings) is dropped, as save_pretrained does.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
_SIDE_FILES = (".json", ".txt", ".model", ".jinja")
"""Files copied beside the weights (config, generation config, tokenizer); index files are not."""


def to_checkpoint_names(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 in-memory Qwen3-MoE names -> the names of an HF checkpoint on disk.

    In memory (transformers >= 5) each MoE layer holds fused expert tensors:
    `mlp.experts.gate_up_proj` [E, 2I, H] (rows [gate; up]: `gate, up = linear(x, W[e]).chunk(2)`)
    and `mlp.experts.down_proj` [E, H, I]. On disk (Qwen3-MoE checkpoints on the hub, what
    `save_pretrained` writes, what SGLang's and vLLM's loaders match) each expert has
    `mlp.experts.{e}.gate_proj.weight` [I, H], `up_proj.weight` [I, H], `down_proj.weight` [H, I].
    Every other name is the same in both; names already per-expert pass through.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.endswith(".mlp.experts.gate_up_proj"):
            prefix = k[: -len("gate_up_proj")]
            if v.ndim != 3 or v.shape[1] % 2:
                raise ValueError(f"{k}: expected a fused [E, 2I, H] tensor, got shape {tuple(v.shape)}")
            gate_EIH, up_EIH = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                # clones: safetensors refuses tensors that share storage
                out[f"{prefix}{e}.gate_proj.weight"] = gate_EIH[e].clone()
                out[f"{prefix}{e}.up_proj.weight"] = up_EIH[e].clone()
        elif k.endswith(".mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            if v.ndim != 3:
                raise ValueError(f"{k}: expected a fused [E, H, I] tensor, got shape {tuple(v.shape)}")
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = v[e].clone()
        else:
            out[k] = v
    return out


def checkpoint_dtype(model_path: str | Path | None) -> torch.dtype | None:
    """The dtype a served checkpoint declares in config.json (`dtype`, or `torch_dtype` before
    transformers 5); None when it declares none."""
    if model_path is None or not (Path(model_path) / "config.json").exists():
        return None
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if not isinstance(name, str):
        return None
    dt = getattr(torch, name.removeprefix("torch."), None)
    return dt if isinstance(dt, torch.dtype) else None


def write_checkpoint(
    out_dir: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    base_model_path: str | Path | None,
    dtype: torch.dtype | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write `state_dict` (transformers names) as <out_dir>/model.safetensors in checkpoint names, floating
    tensors in `dtype` (None: as they are), with the base model's config/tokenizer files beside it. A
    tied lm_head is dropped. Written to a temporary name first and renamed, so a reader never sees
    half a file."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if base_model_path is not None:
        for f in Path(base_model_path).iterdir():
            if f.is_file() and f.suffix in _SIDE_FILES and "index" not in f.name:
                shutil.copy2(f, out / f.name)
    sd = {k: v for k, v in state_dict.items() if not (tie_word_embeddings and k == "lm_head.weight")}
    tensors = {
        k: v.detach().to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        for k, v in to_checkpoint_names(sd).items()
    }
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_FILE)
    return out
