"""`nubes`: the controller, the node agent, the CRD generator and credentials."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import structlog

from nubes.runtime import status_apply
from nubes.runtime.kube import Kube
from nubes.runtime.logging import configure
from nubes.runtime.operator import Operator


def _run(
    name: str,
    field_manager: str,
    kubeconfig: str | None,
    health_port: int | None,
    build: Callable[[Operator], Awaitable[None]],
    *,
    shard: int = 0,
    shards: int = 1,
    health_host: str = "127.0.0.1",
) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        kube = await Kube.connect(kubeconfig, field_manager=field_manager)
        try:
            op = Operator(
                name,
                kube,
                health_port=health_port,
                health_host=health_host,
                shard=shard,
                shards=shards,
            )
            await build(op)
            await op.run(stop)
        finally:
            await kube.close()

    # Children that libraries fork (pyroute2's network-namespace helpers)
    # inherit asyncio's signal wakeup fd: the SIGTERM that ends such a child
    # would reach this process's loop as its own and stop it (seen as an
    # agent Pod exiting 0 seconds after start). The child drops the fd.
    os.register_at_fork(after_in_child=_drop_wakeup_fd)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def _drop_wakeup_fd() -> None:
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)


def controller(args: argparse.Namespace) -> int:
    from nubes.controllers import build_controller
    from nubes.controllers.config import ControllerConfig

    config = ControllerConfig.from_args(args)
    structlog.get_logger().info("starting controller", shard=f"{config.shard}/{config.shards}")
    return _run(
        f"nubes-controller-{config.shard}",
        status_apply.CONTROLLER,  # one writer, whichever shard holds an object
        args.kubeconfig,
        args.health_port,
        lambda op: build_controller(op, config),
        shard=config.shard,
        shards=config.shards,
        health_host=args.health_host,
    )


def agent(args: argparse.Namespace) -> int:
    from nubes.agent import build_agent
    from nubes.agent.config import AgentConfig

    config = AgentConfig.from_args(args)
    structlog.get_logger().info("starting agent", node=config.node)
    return _run(
        f"nubes-agent-{config.node}",
        f"{status_apply.AGENT_PREFIX}{config.node}",
        args.kubeconfig,
        args.health_port,
        lambda op: build_agent(op, config),
        health_host=args.health_host,
    )


def crds(args: argparse.Namespace) -> int:
    from nubes.api import crdgen

    return crdgen.main([args.action, args.directory])


def parser() -> argparse.ArgumentParser:
    from nubes.agent.config import AgentConfig
    from nubes.controllers.config import ControllerConfig

    top = argparse.ArgumentParser(prog="nubes", description=__doc__)
    top.add_argument("--log-level", default="info")
    top.add_argument("--log-json", action="store_true")
    sub = top.add_subparsers(dest="command", required=True)

    c = sub.add_parser("controller", help="cluster-wide reconcilers")
    c.add_argument("--kubeconfig")
    c.add_argument("--health-port", type=int, default=8081)
    # A Pod on the pod network is probed on its own address, not on loopback.
    c.add_argument("--health-host", default="127.0.0.1")
    ControllerConfig.add_arguments(c)
    c.set_defaults(func=controller)

    a = sub.add_parser("agent", help="node agent")
    a.add_argument("--kubeconfig")
    a.add_argument("--health-port", type=int, default=8082)
    a.add_argument("--health-host", default="127.0.0.1")
    AgentConfig.add_arguments(a)
    a.set_defaults(func=agent)

    g = sub.add_parser("crds", help="write or check crds/ from the models")
    g.add_argument("action", choices=["write", "check"])
    g.add_argument("directory", nargs="?", default="crds")
    g.set_defaults(func=crds)

    from nubes.runtime.credentials_cli import add_parsers
    from nubes.runtime.teardown import add_parser as add_teardown

    add_parsers(sub)
    add_teardown(sub)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure(args.log_level, json=args.log_json)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
