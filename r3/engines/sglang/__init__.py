"""SGLang servers as the rollout engine (cluster mode): config (light), HTTP client (engine.py),
routed-experts decoding (routing.py). See engine.py for the protocol."""

from r3.engines.sglang.config import SGLangRolloutConfig

__all__ = ["SGLangRolloutConfig"]
