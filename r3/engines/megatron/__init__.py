"""The megatron-core adapter: GPTModel built from a transformers Qwen3-MoE config, HF<->megatron
weight conversion, RouterReplay wiring with the consumed-once check, the train engine on one or
many ranks, and the CPU/gloo shims that let megatron-core run here.

Modules: `model` (build + convert, TP shards), `hf_io` (lazy per-rank checkpoint reading),
`replay` (MegatronRouterReplay), `train` (MegatronTrainEngine), `optim` (fp32 AdamW or bf16 with
megatron's distributed optimizer), `parallel` (process model: torch.distributed from the
environment, TP/PP/EP/DP layout, DP row slices, gradient and expert exchanges), `memory` (memory
plan per GPU; light), `config` (MegatronTrainConfig; light), `compat` (CPU shims).
megatron-core is imported inside these modules only.
"""
