"""`kubectl nubes` (krew naming: the executable kubectl-nubes): what users do
by hand today, as one command each.

    kubectl nubes console INSTANCE [-f]          the serial console (follow with -f)
    kubectl nubes reboot INSTANCE [--hard]       an InstanceAction, waited for
    kubectl nubes snapshot INSTANCE --image NAME
    kubectl nubes migrate INSTANCE [--to NODE]
    kubectl nubes rescue INSTANCE [--image NS/NAME] | unrescue INSTANCE
    kubectl nubes why [KIND] NAME                 why an object is not Ready
    kubectl nubes hypervisors                     like `openstack hypervisor list`

It drives the kubectl found on PATH (kubectl runs plugins with its own
environment), so KUBECONFIG, contexts and `-n` work as for kubectl; every
request is made as the user, with the user's rights.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

GROUP = "compute.nubes.io"
VERSION = "v1alpha1"


class PluginError(Exception):
    pass


class Kubectl:
    def __init__(self, namespace: str | None, extra: Sequence[str] = ()):
        self.namespace = namespace
        self.extra = list(extra)

    def run(self, *args: str, input: str | None = None, namespaced: bool = True) -> str:
        argv = ["kubectl", *self.extra, *args]
        if namespaced and self.namespace:
            argv += ["-n", self.namespace]
        # The argument list is ours; kubectl is the user's own (as kubectl
        # plugins are run: kubectl's PATH).
        proc = subprocess.run(  # noqa: S603
            argv, input=input, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise PluginError(proc.stderr.strip() or f"kubectl {' '.join(args)} failed")
        return proc.stdout

    def get(self, *args: str, namespaced: bool = True) -> Any:
        return json.loads(self.run("get", *args, "-o", "json", namespaced=namespaced))

    def find(self, resource: str, name: str) -> dict[str, Any] | None:
        out = self.run("get", resource, name, "--ignore-not-found", "-o", "json")
        return json.loads(out) if out.strip() else None


# --- console -----------------------------------------------------------------------


def _new_text(old: str, new: str) -> str:
    """What `new` adds to `old`. The ConfigMap keeps only the console's tail,
    so `new` may start anywhere in `old`: find the earliest line of `old`
    from which `new` continues it."""
    starts = [0] + [i + 1 for i, ch in enumerate(old) if ch == "\n"]
    for k in starts:
        if k < len(old) and new.startswith(old[k:]):
            return new[len(old) - k :]
    return new


def console(k: Kubectl, a: argparse.Namespace) -> int:
    name = f"{a.instance}-console"
    seen = ""
    while True:
        cm = k.find("configmap", name)
        if cm is None and not a.follow:
            raise PluginError(f"no console yet: ConfigMap {name} does not exist")
        text = ((cm or {}).get("data") or {}).get("console.log", "")
        sys.stdout.write(_new_text(seen, text))
        sys.stdout.flush()
        seen = text
        if not a.follow:
            return 0
        time.sleep(a.interval)


# --- instance actions ------------------------------------------------------------------


def _action(k: Kubectl, a: argparse.Namespace, action: str, **spec: Any) -> int:
    if k.find("instances." + GROUP, a.instance) is None:
        raise PluginError(f"instance {a.instance} not found")
    name = f"{a.instance}-{action.lower()}-{secrets.token_hex(3)}"[:253]
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InstanceAction",
        "metadata": {"name": name, **({"namespace": k.namespace} if k.namespace else {})},
        "spec": {"instance": a.instance, "action": action, **spec},
    }
    k.run("create", "-f", "-", input=json.dumps(body), namespaced=False)
    print(f"instanceaction/{name} created ({action})")
    if a.no_wait:
        return 0
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        got = k.find("instanceactions." + GROUP, name) or {}
        status = got.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        stalled = conditions.get("Stalled", {})
        if status.get("error") or stalled.get("status") == "True":
            err = status.get("error") or stalled
            print(f"{action} failed: {err.get('reason')}: {err.get('message')}", file=sys.stderr)
            return 1
        if status.get("completedAt") or conditions.get("Ready", {}).get("status") == "True":
            print(f"{action} done" + (f": {status['result']}" if status.get("result") else ""))
            return 0
        time.sleep(a.interval)
    print(f"{action} still running after {a.timeout:g}s: kubectl nubes why instanceaction {name}")
    return 2


def reboot(k: Kubectl, a: argparse.Namespace) -> int:
    return _action(k, a, "HardReboot" if a.hard else "SoftReboot")


def snapshot(k: Kubectl, a: argparse.Namespace) -> int:
    return _action(k, a, "Snapshot", imageName=a.image)


def migrate(k: Kubectl, a: argparse.Namespace) -> int:
    return _action(k, a, "Migrate", **({"targetNode": a.to} if a.to else {}))


def rescue(k: Kubectl, a: argparse.Namespace) -> int:
    spec: dict[str, Any] = {}
    if a.image:
        ns, _, image = a.image.rpartition("/")
        spec["image"] = {"name": image, **({"namespace": ns} if ns else {})}
    return _action(k, a, "Rescue", **spec)


def unrescue(k: Kubectl, a: argparse.Namespace) -> int:
    return _action(k, a, "Unrescue")


# --- why ---------------------------------------------------------------------------------


def _resolve(k: Kubectl, kind: str | None, name: str) -> dict[str, Any]:
    if kind:
        found = k.find(kind, name)
        if found is None:
            raise PluginError(f"{kind} {name} not found")
        return found
    # Any Nubes kind by that name (namespaced ones in the namespace, then
    # cluster-scoped ones such as Hypervisors and Projects).
    items = [i for i in k.get("nubes")["items"] if i["metadata"]["name"] == name]
    if not items:
        cluster = k.run("api-resources", "--categories=nubes", "--namespaced=false", "-o", "name")
        for resource in cluster.split():
            got = k.run("get", resource, name, "--ignore-not-found", "-o", "json", namespaced=False)
            if got.strip():
                items.append(json.loads(got))
    if not items:
        raise PluginError(f"no Nubes object named {name}")
    if len(items) > 1:
        kinds = ", ".join(i["kind"] for i in items)
        raise PluginError(f"several objects are named {name} ({kinds}): name the kind")
    first: dict[str, Any] = items[0]
    return first


def why(k: Kubectl, a: argparse.Namespace) -> int:
    kind, name = (a.args[0], a.args[1]) if len(a.args) == 2 else (None, a.args[0])
    obj = _resolve(k, kind, name)
    meta, status = obj["metadata"], obj.get("status") or {}
    lines = [
        f"{obj['kind']} {meta.get('namespace', '') + '/' if meta.get('namespace') else ''}{name}"
    ]
    if meta.get("deletionTimestamp"):
        lines.append(f"  being deleted since {meta['deletionTimestamp']}, waiting for "
                     f"finalizers {', '.join(meta.get('finalizers', [])) or '(none)'}")  # fmt: skip
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation and observed != generation:
        lines.append(f"  the controller has not yet acted on generation {generation} "
                     f"(observed: {observed})")  # fmt: skip
    conditions = status.get("conditions", [])
    if not conditions:
        lines.append("  no conditions yet: the controller has not reconciled it")
    for c in conditions:
        detail = ": ".join(x for x in (c.get("reason"), c.get("message")) if x)
        lines.append(f"  {c['type']}={c['status']}  {detail}")
    problem = status.get("nodeProblem")
    if problem:
        retry = "retrying" if problem.get("retryable", True) else "waiting for a change"
        lines.append(f"  node {problem.get('node') or '?'}: {problem['reason']}: "
                     f"{problem['message']} ({retry})")  # fmt: skip
    error = status.get("error")
    if error:
        lines.append(f"  error: {error.get('reason')}: {error.get('message')}")
    selector = f"involvedObject.name={name},involvedObject.kind={obj['kind']}"
    events = k.get("events", "--field-selector", selector, namespaced=bool(meta.get("namespace")))
    for e in sorted(
        events["items"], key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or ""
    ):
        lines.append(f"  event {e.get('type')} {e.get('reason')}: {e.get('message')}")
    print("\n".join(lines))
    ready = next((c for c in conditions if c["type"] == "Ready"), None)
    return 0 if ready and ready["status"] == "True" else 1


# --- hypervisors -------------------------------------------------------------------------


def hypervisors(k: Kubectl, a: argparse.Namespace) -> int:
    rows = [("NAME", "ZONE", "STATE", "READY", "VIRT", "VCPUS", "RAM MIB", "VMS", "HOST IP")]
    for hv in k.get("hypervisors." + GROUP, namespaced=False)["items"]:
        s, spec = hv.get("status") or {}, hv.get("spec") or {}
        ready: dict[str, Any] = next(
            (c for c in s.get("conditions", []) if c["type"] == "Ready"), {}
        )
        rows.append(
            (
                hv["metadata"]["name"],
                spec.get("availabilityZone", "nova"),
                "disabled" if spec.get("disabled") else "enabled",
                "up" if ready.get("status") == "True" else f"down ({ready.get('reason', '?')})",
                s.get("virtType") or "-",
                f"{s.get('vcpusUsed') or 0}/{s.get('vcpus') or '?'}",
                f"{s.get('ramMibUsed') or 0}/{s.get('ramMib') or '?'}",
                str(s.get("runningVms") or 0),
                s.get("hostIp") or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


# --- command line ------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="kubectl nubes", description=__doc__.split("\n\n")[0])
    top.add_argument("-n", "--namespace")
    top.add_argument("--context")
    top.add_argument("--kubeconfig")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("-n", "--namespace", dest="sub_namespace")
        p.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
        p.set_defaults(func=func)
        return p

    c = command("console", console, "print (or follow) an instance's serial console")
    c.add_argument("instance")
    c.add_argument("-f", "--follow", action="store_true")
    for name, func, help in (
        ("reboot", reboot, "soft (ACPI) or --hard reboot"),
        ("snapshot", snapshot, "root disk to a new Image"),
        ("migrate", migrate, "cold migration to another node"),
        ("rescue", rescue, "boot a rescue image with the root disk attached"),
        ("unrescue", unrescue, "leave rescue"),
    ):
        p = command(name, func, help)
        p.add_argument("instance")
        p.add_argument("--timeout", type=float, default=600)
        p.add_argument("--no-wait", action="store_true")
        if name == "reboot":
            p.add_argument("--hard", action="store_true")
        if name == "snapshot":
            p.add_argument("--image", required=True, help="name of the Image to create")
        if name == "migrate":
            p.add_argument("--to", help="target node (cloud admins only)")
        if name == "rescue":
            p.add_argument("--image", help="rescue image, [NAMESPACE/]NAME")
    w = command("why", why, "conditions, node problem and events of an object")
    w.add_argument("args", nargs="+", metavar="[KIND] NAME")
    command("hypervisors", hypervisors, "the compute nodes")
    return top


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    extra = [f"--{f}={v}" for f in ("context", "kubeconfig") if (v := getattr(a, f))]
    k = Kubectl(a.sub_namespace or a.namespace, extra)
    try:
        result: int = a.func(k, a)
        return result
    except PluginError as e:
        print(f"kubectl nubes {a.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
