"""One registry of engines: a name -> (frozen config dataclass, engine class) for rollout and train.

    cfg = rollout_config("hf", model_path=..., precision="bf16")   # refuses unknown names
    engine = build_rollout_engine(cfg)                              # engine.capabilities says what it can do

Every engine class has a `from_config(cfg)` constructor; the registry imports it lazily (by
"module:attr"), so building an hf engine never imports megatron, sglang or vllm. Adding an
engine is one new module (or package) with its config dataclass and engine class, plus one
`register_*` line below.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from r3.engines.base import RolloutEngine, TrainEngine
from r3.engines.hf.config import HFRolloutConfig, HFTrainConfig
from r3.engines.megatron.config import MegatronTrainConfig
from r3.engines.sglang.config import SGLangRolloutConfig  # light: no sglang import
from r3.engines.vllm.config import VLLMRolloutConfig  # light: no vllm import


@dataclasses.dataclass(frozen=True)
class _Entry:
    config_cls: type
    engine_path: str
    """"module:attr" of the engine class (imported only when an engine is built)."""

    def engine_cls(self) -> type:
        module, attr = self.engine_path.split(":")
        return getattr(importlib.import_module(module), attr)


_ROLLOUT: dict[str, _Entry] = {}
_TRAIN: dict[str, _Entry] = {}


def register_rollout(config_cls: type, engine_path: str) -> None:
    """Register a rollout engine under config_cls.name."""
    _ROLLOUT[config_cls.name] = _Entry(config_cls, engine_path)


def register_train(config_cls: type, engine_path: str) -> None:
    """Register a train engine under config_cls.name."""
    _TRAIN[config_cls.name] = _Entry(config_cls, engine_path)


def _lookup(table: dict[str, _Entry], kind: str, name: str) -> _Entry:
    if name not in table:
        raise ValueError(f"unknown {kind} engine {name!r}; known: {sorted(table)}")
    return table[name]


def rollout_engine_names() -> tuple[str, ...]:
    return tuple(sorted(_ROLLOUT))


def train_engine_names() -> tuple[str, ...]:
    return tuple(sorted(_TRAIN))


def rollout_config(name: str, **fields: Any):
    """The frozen config of rollout engine `name` (its dataclass validates the fields)."""
    return _lookup(_ROLLOUT, "rollout", name).config_cls(**fields)


def train_config(name: str, **fields: Any):
    """The frozen config of train engine `name`."""
    return _lookup(_TRAIN, "train", name).config_cls(**fields)


def _build(table: dict[str, _Entry], kind: str, config: Any):
    entry = _lookup(table, kind, getattr(type(config), "name", type(config).__name__))
    if type(config) is not entry.config_cls:
        raise TypeError(
            f"{kind} engine {config.name!r} takes a {entry.config_cls.__name__}, got {type(config).__name__}"
        )
    return entry.engine_cls().from_config(config)


def build_rollout_engine(config: Any) -> RolloutEngine:
    """Build the rollout engine that `config` (a registered config dataclass) describes."""
    return _build(_ROLLOUT, "rollout", config)


def build_train_engine(config: Any) -> TrainEngine:
    """Build the train engine that `config` describes."""
    return _build(_TRAIN, "train", config)


# --- the engines -------------------------------------------------------------------------------
register_rollout(HFRolloutConfig, "r3.engines.hf.rollout:HFRolloutEngine")
register_train(HFTrainConfig, "r3.engines.hf.train:HFTrainEngine")
register_train(MegatronTrainConfig, "r3.engines.megatron.train:MegatronTrainEngine")
register_rollout(SGLangRolloutConfig, "r3.engines.sglang.engine:SGLangRolloutEngine")
register_rollout(VLLMRolloutConfig, "r3.engines.vllm.engine:VLLMRolloutEngine")
