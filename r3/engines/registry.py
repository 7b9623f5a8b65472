"""One registry of engines: a name -> (frozen config dataclass, engine class) for rollout and train.

    cfg = rollout_config("hf", model_path=..., precision="bf16")   # refuses unknown names
    engine = build_rollout_engine(cfg)                              # engine.capabilities says what it can do

Every engine class has a `from_config(cfg)` constructor; the registry imports it lazily (by
"module:attr"), so building an hf engine never imports megatron, sglang or vllm. Adding an
engine is one new module (or package) with its config dataclass and engine class, plus one
`register_*` line below.

Callers never branch on engine names: what a run (or a static measurement, an evaluation) asks of
its engines is said in engine-neutral `RolloutSettings` / `TrainSettings`, and `rollout_config_for`
/ `train_config_for` map it onto the engine's own config by field name (a setting the engine's
config has no field for does not apply to that engine). A config class says the rest with class
attributes: `server_launcher` ("module:function" building the launch specs of its servers, read by
slurm.servers; absent: in-process only), `servers_only` (it cannot run without server URLs) and
`capture_hint` (what to do when it does not capture routing).
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
DEFAULT_ROLLOUT = "hf"
"""The embedded default rollout engine (its static measurements are stored under the bare precision)."""
DEFAULT_TRAIN = "hf"


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutSettings:
    """What a caller asks of its rollout engine, whatever the engine."""

    model_path: str
    precision: str = "bf16"
    seed: int = 0
    urls: tuple[str, ...] = ()
    """Servers of a server-backed engine; empty: in-process (an engine that has that mode)."""
    weight_sync_dir: str | None = None
    """A directory the servers can read, for engines that sync weights through disk."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further config fields by name (e.g. fp8_scope, device); applied where the engine's config has them."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """What a caller asks of its train engine, whatever the engine."""

    model_path: str
    lr: float
    seed: int = 0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Further config fields by name (weight_decay, micro_batch, tensor_parallel, precision, ...);
    applied where the engine's config has them."""


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def rollout_config_for(name: str, s: RolloutSettings):
    """The config of rollout engine `name` for settings `s` (see the module docstring)."""
    cls = _lookup(_ROLLOUT, "rollout", name).config_cls
    fields = _fields(cls)
    if s.urls and "urls" not in fields:
        raise ValueError(f"rollout engine {name!r} runs in process and takes no server URLs; got {list(s.urls)}")
    if not s.urls and getattr(cls, "servers_only", False):
        raise ValueError(
            f"rollout engine {name!r} runs on servers only: give their URLs (RunConfig.rollout_urls, or let "
            "slurm.submit launch them)"
        )
    kw: dict[str, Any] = {"model_path": str(s.model_path)}
    for key in ("precision", "seed"):
        if key in fields:
            kw[key] = getattr(s, key)
    if s.urls:
        kw["urls"] = tuple(s.urls)
        if "weight_sync_dir" in fields and s.weight_sync_dir is not None:
            kw["weight_sync_dir"] = str(s.weight_sync_dir)
    kw.update({k: v for k, v in s.options.items() if k in fields})
    return cls(**kw)


def train_config_for(name: str, s: TrainSettings):
    """The config of train engine `name` for settings `s` (see the module docstring)."""
    cls = _lookup(_TRAIN, "train", name).config_cls
    fields = _fields(cls)
    kw: dict[str, Any] = {"model_path": str(s.model_path), "lr": s.lr, "seed": s.seed}
    kw.update({k: v for k, v in s.options.items() if k in fields})
    return cls(**kw)


def train_config_has(name: str, field: str) -> bool:
    """The config of train engine `name` has `field` (a setting that applies to it)."""
    return field in _fields(_lookup(_TRAIN, "train", name).config_cls)


def rollout_config_has(name: str, field: str) -> bool:
    """The config of rollout engine `name` has `field` (a setting that applies to it)."""
    return field in _fields(_lookup(_ROLLOUT, "rollout", name).config_cls)


def multi_rank(name: str) -> bool:
    """Train engine `name` trains on several ranks (its config's `multi_rank`; else one process)."""
    return bool(getattr(_lookup(_TRAIN, "train", name).config_cls, "multi_rank", False))


def rollout_config_class(name: str) -> type:
    return _lookup(_ROLLOUT, "rollout", name).config_cls


def server_only(name: str) -> bool:
    """Rollout engine `name` cannot run without server URLs."""
    return bool(getattr(rollout_config_class(name), "servers_only", False))


def server_launcher(name: str):
    """The function that builds the launch specs of rollout engine `name`'s servers (slurm.servers
    calls it), or None for an engine that runs in process only."""
    path = getattr(rollout_config_class(name), "server_launcher", None)
    if path is None:
        return None
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def static_precisions(name: str) -> tuple[str, ...]:
    """The precisions a static measurement of rollout engine `name` covers by default (its config's
    `static_precisions`: the mismatched precisions it serves, and fp32 where fp32 is its only control)."""
    return tuple(getattr(rollout_config_class(name), "static_precisions", ("bf16",)))


def capture_hint(name: str) -> str:
    """What to do when rollout engine `name` does not capture routing."""
    return getattr(
        rollout_config_class(name), "capture_hint", "use an MoE model (model='base'/'sft' or an MoE model_path)"
    )


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
