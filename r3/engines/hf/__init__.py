"""The transformers adapter: in-process rollout (bf16 / FP8 / fp32), fp32 training, and routing
record/replay on transformers' Qwen3-MoE blocks (`replay.RoutingReplay`).

Modules: `rollout` (HFRolloutEngine), `train` (HFTrainEngine), `replay` (the router hooks),
`fp8` (e4m3 weight quantisation for the FP8 inference engine). Importing this package imports
nothing heavy; each module imports transformers itself.
"""
