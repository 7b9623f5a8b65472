"""The megatron-core adapter: GPTModel built from a transformers Qwen3-MoE config, HF<->megatron
weight conversion, RouterReplay wiring with the consumed-once check, the train engine, and the
CPU/gloo shims that let megatron-core run here.

Modules: `model` (build + convert), `replay` (MegatronRouterReplay), `train`
(MegatronTrainEngine), `compat` (process group and CPU shims). megatron-core is imported inside
these modules only.
"""
