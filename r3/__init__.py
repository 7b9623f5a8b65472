"""Rollout Routing Replay (R3): the library. Importable with no engine (sglang, megatron) installed."""
