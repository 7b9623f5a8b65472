"""The two optimizer paths of the megatron train engine, behind one small interface.

- `Fp32AdamW` (precision "fp32", the embedded default): fp32 parameters and gradients,
  `torch.optim.AdamW`, replicated on every DP rank; gradients summed over replicas by
  r3.engines.megatron.parallel.allreduce_grads and clipped by its global norm.
- `MegatronMixedPrecision` (precision "bf16", what a 30B cluster run needs): bf16 parameters,
  megatron's DistributedDataParallel with an fp32 gradient buffer (main grads), and megatron's
  distributed optimizer (fp32 master weights + Adam state sharded over the DP replicas of each
  parameter: dense over DP, experts over expert-DP), megatron's clipping and found-inf skip.
  Gradients are summed, not averaged, over DP (`calculate_per_token_loss=True` in the model's
  config): the loss is already normalised by the whole mini-batch (r3.engines.base.LossFn).
  On CPU the optimizer runs inside compat.cuda_as_cpu (its hard-coded CUDA tensors and type checks).

Interface: `module` (what forward runs on), `zero_grad()`, `step() -> (grad_norm tensor, skipped)`,
`lr`, `state_dict()` / `load_state_dict()` (this rank's part, for per-rank checkpoint files).
"""

from __future__ import annotations

import math

import torch

from r3.engines.megatron import parallel
from r3.engines.megatron.compat import cuda_as_cpu


class Fp32AdamW:
    def __init__(self, model, *, lr: float, weight_decay: float, grad_clip: float, world_size: int):
        self.module, self.grad_clip, self.world_size = model, grad_clip, world_size
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> tuple[torch.Tensor, bool]:
        if self.world_size > 1:
            params = list(self.module.parameters())
            parallel.allreduce_sequence_parallel_grads(params)
            parallel.allreduce_grads(params)
            norm = parallel.clip_grad_norm(params, self.grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.grad is not None], self.grad_clip
            )
        skipped = not math.isfinite(float(norm))  # one sync: the skip decision needs it on the host
        if skipped:  # megatron's optimizer skips a step on found_inf; so does this one
            self.zero_grad()
        else:
            self.optimizer.step()
        return norm.detach(), skipped

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class MegatronMixedPrecision:
    def __init__(self, model, *, lr: float, weight_decay: float, grad_clip: float):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        if not model.config.bf16 or not model.config.calculate_per_token_loss:
            raise ValueError(
                "MegatronMixedPrecision needs a model built with precision='bf16' (bf16 params, "
                "calculate_per_token_loss: gradients summed over DP)"
            )
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            use_distributed_optimizer=True,
            overlap_grad_reduce=False,
            overlap_param_gather=False,
        )
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=lr,
            weight_decay=weight_decay,
            bf16=True,
            use_distributed_optimizer=True,
            clip_grad=grad_clip,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_eps=1e-8,
        )  # torch AdamW defaults
        with cuda_as_cpu():
            self.module = DistributedDataParallel(model.config, ddp_config, model)
            self.optimizer = get_megatron_optimizer(opt_config, [self.module])
        self._lr = lr

    @property
    def lr(self) -> float:
        return self._lr

    def zero_grad(self) -> None:
        with cuda_as_cpu():
            self.module.zero_grad_buffer()
            self.optimizer.zero_grad()

    def step(self) -> tuple[torch.Tensor, bool]:
        from megatron.core.distributed import finalize_model_grads

        with cuda_as_cpu():  # DP reduce-scatter into the fp32 main-grad shards; SP norm/router grads over TP
            finalize_model_grads([self.module])
            ok, grad_norm, _ = self.optimizer.step()  # clip, Adam on fp32 shards, all-gather bf16 params
        norm = torch.tensor(float("nan") if grad_norm is None else float(grad_norm))
        return norm, not ok

    def _subs(self):
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    def state_dict(self) -> dict:
        """This rank's fp32 master shards and Adam state (same layout on load: same world and TP/PP/EP)."""
        out = []
        for sub in self._subs():
            out.append(
                {
                    "inner": sub.optimizer.state_dict(),
                    "main": [[t.detach().clone() for t in group] for group in sub.shard_fp32_from_float16_groups],
                }
            )
        return {"subs": out}

    def load_state_dict(self, state: dict) -> None:
        subs = self._subs()
        if len(state["subs"]) != len(subs):
            raise ValueError(f"checkpoint holds {len(state['subs'])} optimizer parts, this engine has {len(subs)}")
        for sub, saved in zip(subs, state["subs"]):
            for group, saved_group in zip(sub.shard_fp32_from_float16_groups, saved["main"]):
                for t, v in zip(group, saved_group):
                    t.data.copy_(v)
            sub.optimizer.load_state_dict(saved["inner"])
        # the bf16 model parameters come from the same checkpoint (the engine's model state dict)
