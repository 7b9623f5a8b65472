"""Inference servers an engine needs, as launch specs (light: the standard library). Each
server-backed engine builds its own (r3.engines.<engine>.servers, named by its config's
`server_launcher`); slurm.servers runs them. One spec per server process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerSpec:
    """One server process."""

    name: str
    """Log file stem, e.g. `node3-30000`."""
    command: tuple[str, ...]
    url: str
    """Base URL the server answers on, e.g. `http://node3:30000`."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment variables."""
    health_path: str = "/health"
    """GET path answering 200 when ready (SGLang: /health; /health_generate also runs a decode)."""


def specs_on_node(
    *,
    host: str,
    servers: int,
    tp: int,
    port: int,
    command: Callable[[int, int], Sequence[str]],
    env: Callable[[int], tuple[tuple[str, str], ...]] = lambda i: (),
) -> list[ServerSpec]:
    """`servers` servers on this node: server i gets GPUs i*tp..i*tp+tp-1 and port `port + i`;
    command(i, port) is its command line, env(i) its extra environment."""
    return [
        ServerSpec(
            name=f"{host}-{port + i}", command=tuple(command(i, port + i)), url=f"http://{host}:{port + i}", env=env(i)
        )
        for i in range(servers)
    ]


Launcher = Callable[..., list[ServerSpec]]
"""specs(*, model_path, host, servers, tp, port, capture_routing, precision, seed, extra) -> one spec per server."""


def launcher(
    command: Callable[..., Sequence[str]], env: Callable[[int, int], tuple[tuple[str, str], ...]] = lambda i, tp: ()
) -> Launcher:
    """An engine's Launcher from its one-server command line: command(i, port, *, model_path, tp,
    capture_routing, precision, seed, extra) for server i of the node; env(i, tp) its extra environment."""

    def specs(
        *,
        model_path: str,
        host: str,
        servers: int,
        tp: int,
        port: int,
        capture_routing: bool = True,
        precision: str = "bf16",
        seed: int = 0,
        extra: Sequence[str] = (),
    ) -> list[ServerSpec]:
        def one(i: int, p: int) -> Sequence[str]:
            kw = dict(model_path=model_path, tp=tp, capture_routing=capture_routing, precision=precision, seed=seed)
            return command(i, p, extra=extra, **kw)

        return specs_on_node(host=host, servers=servers, tp=tp, port=port, command=one, env=lambda i: env(i, tp))

    return specs
