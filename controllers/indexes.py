"""Store indexes more than one reconciler of the controller reads, each
defined once here. Reconcilers call these from `setup`; a repeated call
registers the same function again, which the store accepts, while a second,
different definition under the same name is refused (nubes.runtime.store),
so two readers can never disagree on what an index holds."""

from __future__ import annotations

from nubes.api.compute import Instance, InstanceAction
from nubes.api.identity import Project
from nubes.api.network import FloatingIP, Port
from nubes.runtime.operator import Operator


def project_namespace(p: Project) -> list[str]:
    return [p.status.namespace or p.name]


def instance_uid(i: Instance) -> list[str]:
    return [i.uid]


def floating_ip_port(f: FloatingIP) -> list[str]:
    return [f"{f.namespace}/{f.spec.port}"] if f.spec.port else []


def port_device(p: Port) -> list[str]:
    return [p.spec.device_id] if p.spec.device_id else []


def action_instance(a: InstanceAction) -> list[str]:
    return [f"{a.namespace}/{a.spec.instance}"]


def index_projects(op: Operator) -> None:
    """Project by the namespace it owns: "namespace"."""
    op.store(Project).add_index("namespace", project_namespace)


def index_instances(op: Operator) -> None:
    """Instance by uid: "uid" (ports name their instance by uid)."""
    op.store(Instance).add_index("uid", instance_uid)


def index_ports(op: Operator) -> None:
    """Port by the uid of the instance it belongs to: "device"."""
    op.store(Port).add_index("device", port_device)


def index_actions(op: Operator) -> None:
    """InstanceAction by its instance's key: "instance"."""
    op.store(InstanceAction).add_index("instance", action_instance)


def index_floating_ips(op: Operator) -> None:
    """FloatingIP by the key of the port it is associated with: "fip-port"."""
    op.store(FloatingIP).add_index("fip-port", floating_ip_port)
