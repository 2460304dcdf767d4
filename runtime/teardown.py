"""`nubes teardown-nodes`: the chart's pre-delete hook. Asks every node
agent to remove what it made on its host and waits for their answers
(agent/teardown.py says what an agent does).

Why a hook and not the agent's own shutdown: a Pod's SIGTERM does not say
whether it is an upgrade's roll (the host state must stay: guests run on it)
or an uninstall; only Helm knows, before it deletes the DaemonSet.

- Every Hypervisor gets the nubes.io/teardown annotation with a fresh
  request id; each live agent (heartbeat within 60 s) answers in
  status.teardown.
- One Blocked answer (objects still use a node): the request is withdrawn
  from every Hypervisor (a node already torn down restarts its agent and
  rebuilds) and the hook fails naming the objects, so `helm uninstall`
  stops before deleting anything and no guest loses its node.
- All live agents Done: the Hypervisors are deleted (the node registrations
  go with the release; a new install's agents register afresh), and Helm
  goes on deleting the release. A node whose agent is dead cannot clean up:
  it is named in the output, and its Hypervisor deleted too.

Its RBAC (chart: templates/hooks/teardown.yaml): get, list, patch and
delete of Hypervisors, nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field

from nubes.api.compute import Hypervisor
from nubes.api.meta import seconds_since
from nubes.runtime.kube import Kube, path_of

ANNOTATION = "nubes.io/teardown"
"""Same key as nubes.agent.teardown.ANNOTATION (the tiers share no module)."""
HEARTBEAT_TIMEOUT = 60.0
"""As the controller's: an agent silent for longer is taken for dead."""


@dataclass
class Progress:
    done: list[str] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)


def progress(hypervisors: list[Hypervisor], request: str, dead: set[str]) -> Progress:
    """Where each node stands on `request`; `dead` were silent at the start."""
    p = Progress()
    for hv in sorted(hypervisors, key=lambda h: h.name):
        report = hv.status.teardown
        if report is not None and report.request == request:
            if report.state == "Blocked":
                p.blocked[hv.name] = report.message
            else:
                p.done.append(hv.name)
        elif hv.name in dead:
            p.dead.append(hv.name)
        else:
            p.waiting.append(hv.name)
    return p


def silent(hypervisors: list[Hypervisor]) -> set[str]:
    out = set()
    for hv in hypervisors:
        age = seconds_since(hv.status.heartbeat_time)
        if age is None or age > HEARTBEAT_TIMEOUT:
            out.add(hv.name)
    return out


async def _annotate(kube: Kube, names: list[str], value: str | None) -> None:
    patch = {"metadata": {"annotations": {ANNOTATION: value}}}
    for name in names:
        try:
            await kube.patch_raw(path_of(Hypervisor), name, patch)
        except Exception as e:  # gone meanwhile, or the API refused: say so
            print(f"could not update Hypervisor {name}: {e}", file=sys.stderr)


async def teardown_nodes(kube: Kube, timeout: float, poll: float = 1.0) -> int:
    request = uuid.uuid4().hex[:12]
    hypervisors = await kube.list(Hypervisor)
    names = [hv.name for hv in hypervisors]
    dead = silent(hypervisors)
    print(f"teardown {request}: asking the agents of {len(names)} nodes", flush=True)
    await _annotate(kube, names, request)
    deadline = time.monotonic() + timeout
    while True:
        p = progress(await kube.list(Hypervisor), request, dead)
        if p.blocked:
            await _annotate(kube, names, None)
            for node, why in p.blocked.items():
                print(f"node {node}: {why}", file=sys.stderr)
            print(
                "uninstall refused: delete the objects that still use the nodes first"
                " (nothing was deleted; torn-down agents restart)",
                file=sys.stderr,
            )
            return 1
        if not p.waiting:
            break
        if time.monotonic() > deadline:
            await _annotate(kube, names, None)
            print(f"no answer from the agents of: {', '.join(p.waiting)}", file=sys.stderr)
            return 1
        await asyncio.sleep(poll)
    for node in p.dead:
        print(f"node {node}: agent silent, its host state (if any) is left", flush=True)
    for name in names:
        await kube.delete_raw(path_of(Hypervisor), name)
    print(f"teardown {request}: done on {', '.join(p.done) or 'no node'}", flush=True)
    return 0


def main(args: argparse.Namespace) -> int:
    async def run() -> int:
        kube = await Kube.connect(args.kubeconfig, field_manager="nubes-teardown")
        try:
            return await teardown_nodes(kube, args.timeout)
        finally:
            await kube.close()

    return asyncio.run(run())


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    t = sub.add_parser(
        "teardown-nodes",
        help="uninstall hook: every node agent removes its host state (refused while in use)",
    )
    t.add_argument("--kubeconfig")
    t.add_argument("--timeout", type=float, default=240.0)
    t.set_defaults(func=main)
