"""Read a transformers Qwen3(-MoE) checkpoint directory lazily: each training rank reads only the
tensors it keeps (dense weights and its own experts under expert parallelism), in fp32.

    sd = LazyHFStateDict(path)           # a Mapping in transformers-5 in-memory names
    hf_to_megatron(sd, config, ep_rank=r, ep_size=n)   # touches only this rank's experts

Checkpoints on disk (the hub's Qwen3-MoE, and what `save_pretrained` writes) store one tensor per
expert (`mlp.experts.{e}.gate_proj.weight`, `up_proj`, `down_proj`); transformers 5 fuses them in
memory (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]), and that is the
naming r3.engines.megatron.model converts. `LazyHFStateDict` presents the fused names without
building the fused tensors: `sd[...gate_up_proj]` is an `ExpertStack` whose `[e]` reads expert e
only. A checkpoint already holding fused names is read as is. Loading the whole model instead
(`from_pretrained`) costs every rank the full fp32 model in host memory: 122 GB for 30.5B.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

_EXPERT = re.compile(r"^(?P<pre>.*\.mlp\.experts\.)(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


class ExpertStack:
    """The fused in-memory expert tensor of one layer, read one expert at a time.

    kind "gate_up": [e] = cat(gate_proj[e], up_proj[e]) rows ([2I, H], transformers' order);
    kind "down": [e] = down_proj[e] ([H, I])."""

    def __init__(self, owner: "LazyHFStateDict", prefix: str, kind: str, num_experts: int):
        self.owner, self.prefix, self.kind = owner, prefix, kind
        self.shape = (num_experts,)

    def __getitem__(self, e: int) -> torch.Tensor:
        if not 0 <= e < self.shape[0]:
            raise IndexError(f"{self.prefix}: expert {e} of {self.shape[0]}")
        if self.kind == "gate_up":
            return torch.cat(
                [
                    self.owner.read(f"{self.prefix}{e}.gate_proj.weight"),
                    self.owner.read(f"{self.prefix}{e}.up_proj.weight"),
                ],
                dim=0,
            )
        return self.owner.read(f"{self.prefix}{e}.down_proj.weight")


class LazyHFStateDict(Mapping):
    """A checkpoint directory's tensors under transformers-5 in-memory names, read on access (fp32)."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        self.path, self.dtype = Path(path), dtype
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.path} holds no model.safetensors(.index.json): not a transformers "
                "checkpoint directory in safetensors format"
            )
        self.file_of: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        experts: dict[str, set[int]] = {}
        self._names: dict[str, object] = {}
        for k in weight_map:
            m = _EXPERT.match(k)
            if m is None:
                self._names[k] = k
            else:
                experts.setdefault(m["pre"], set()).add(int(m["e"]))
        for pre, ids in experts.items():
            if ids != set(range(len(ids))):
                raise ValueError(f"{self.path}: experts of {pre[:-1]} are not 0..{len(ids) - 1}: {sorted(ids)[:10]}")
            self._names[pre + "gate_up_proj"] = ExpertStack(self, pre, "gate_up", len(ids))
            self._names[pre + "down_proj"] = ExpertStack(self, pre, "down", len(ids))

    def read(self, disk_name: str) -> torch.Tensor:
        """One tensor by its on-disk name, as self.dtype (floating tensors only are cast)."""
        from safetensors import safe_open

        fname = self.file_of[disk_name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.path / fname), "pt")
        t = self._handles[fname].get_tensor(disk_name)
        return t.to(self.dtype) if t.is_floating_point() else t

    def __getitem__(self, name: str):
        v = self._names[name]
        return v if isinstance(v, ExpertStack) else self.read(v)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
