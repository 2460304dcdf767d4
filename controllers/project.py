"""Project: the tenant's namespace and the role bindings of its members.

Who may use it is in its RoleBindings (controllers/project_access.py):
disabling a project empties them all, enabling it binds them again, and a
member who loses a role loses what they granted with it. Nothing else in
the namespace is touched.

Deleting a project deletes its namespace (owner reference, garbage
collector), and the namespace controller deletes every object in it at once,
in no particular order. The order that matters is kept by the finalizers,
not by this controller, so a project needs no finalizer of its own:
- an Instance keeps its compute agent's finalizer until the guest is torn
  down; the agent unplugs the guest's NICs from its own record on the node
  (ports.json), so it does not matter that the Ports may go first;
- a Volume waits (controller finalizer) for its snapshots, for the instances
  using it and for its clones, then its storage agent's finalizer wipes the
  data and the export; snapshots and backups likewise wait for dependants;
- a Subnet waits until no port holds an address in it; a Network waits for
  its ports, then deletes its DHCP port and releases its own Allocations
  (cluster-scoped IPAM ledger); a Port's claims are released when it goes
  (and by the orphan sweep after a crash);
- the network agent is level-based: a DHCP server (namespace, dnsmasq) or a
  switch port whose objects are gone is removed at its next plan.
tests/integration/test_project_lifecycle.py deletes a project holding a
network, subnet, ports, a volume and its snapshot and checks that nothing is
left in the API server or on the nodes.
"""

from __future__ import annotations

from typing import Any

import structlog

from nubes.api.identity import Project, ProjectStatus, ProjectUsage, UsageItem
from nubes.controllers import quota
from nubes.controllers.project_access import (
    PROJECT_LABEL,
    RoleBindingSeen,
    binding_patch,
    credentials_to_end,
    lost_roles,
    namespace_of,
    role_binding,
)
from nubes.controllers.security_group import ensure_default_group
from nubes.runtime.credentials import APP_CREDENTIAL_LABEL, ROLES, SERVICEACCOUNTS
from nubes.runtime.kube import NAMESPACES, RESOURCEQUOTAS, ROLEBINDINGS, ApiError, path_of
from nubes.runtime.operator import Operator
from nubes.runtime.reconcile import Outcome, Reconciler, Stall

log = structlog.get_logger()


def owner_reference(project: Project) -> dict[str, Any]:
    return {
        "apiVersion": project.crd.api_version,
        "kind": project.crd.kind,
        "name": project.name,
        "uid": project.uid,
        "controller": True,
    }


def resource_quota(project: Project) -> dict[str, Any]:
    """The counted quotas, enforced by the API server's ResourceQuota admission."""
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {
            "name": quota.QUOTA_NAME,
            "namespace": namespace_of(project),
            "labels": {PROJECT_LABEL: project.name},
        },
        "spec": {"hard": quota.hard_limits(project.spec.quotas)},
    }


class ProjectReconciler(Reconciler[Project]):
    kind = Project
    workers = 2

    def setup(self, op: Operator) -> None:
        super().setup(op)
        quota.index_consumers(op)
        projects = op.store(Project)
        # What project admins bind is checked when they bind it.
        op.watch(
            RoleBindingSeen,
            Project,
            lambda b: [p.key for p in projects.by_index("namespace", b.namespace or "")],
        )
        # Usage follows creations and deletions; the ledger follows deletions.
        for kind in {k for _, k in quota.COUNTED} | set(quota.CONSUMERS):
            op.watch(
                kind,
                Project,
                lambda o: [p.key for p in projects.by_index("namespace", o.namespace or "")],
                when=lambda old, new: old is None or new is None,
            )

    async def converge(self, obj: Project) -> Outcome:
        kube = self.op.kube
        name = namespace_of(obj)
        namespace = await kube.get_raw(NAMESPACES, name)
        if namespace is None:
            await kube.create_raw(
                NAMESPACES,
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": name,
                        "labels": {PROJECT_LABEL: obj.name},
                        # Deleting the project deletes the namespace (and all in it).
                        "ownerReferences": [owner_reference(obj)],
                    },
                },
            )
        else:
            owner = namespace["metadata"].get("labels", {}).get(PROJECT_LABEL)
            if owner != obj.name:
                raise Stall(
                    "NamespaceTaken",
                    f"namespace {name} already exists and belongs to "
                    + (f"project {owner}" if owner else "no project"),
                )
            if namespace.get("status", {}).get("phase") == "Terminating":
                return Outcome.progressing(
                    "NamespaceTerminating",
                    f"namespace {name} is being deleted",
                    requeue_after=2,
                )
        # The counted quotas first: nobody is bound before they hold.
        wanted = resource_quota(obj)
        current = await kube.get_raw(RESOURCEQUOTAS, quota.QUOTA_NAME, name)
        if current is None or current.get("spec", {}).get("hard", {}) != wanted["spec"]["hard"]:
            current = await kube.apply_raw(RESOURCEQUOTAS, wanted)
        settled = await self._bindings(obj, name)
        bound = obj.spec.members if settled else obj.status.bound
        again = None if settled else 1.0
        counted = (current or {}).get("status", {})
        hard = wanted["spec"]["hard"]
        if hard and (set(counted.get("hard", {})) != set(hard) or "used" not in counted):
            # Until the quota controller has counted, the API server refuses
            # every creation the quota covers ("status unknown for quota"):
            # the project is not usable yet.
            return Outcome.progressing(
                "CountingUsage",
                f"waiting for the quota controller to count namespace {name}",
                ProjectStatus(namespace=name, usage=self._usage(obj, name), bound=bound),
                requeue_after=1,
            )
        await ensure_default_group(self.op, name)
        await self._drop_gone(obj, name)
        members = len(obj.spec.members)
        summary = f"namespace {name}, {members} member{'s' if members != 1 else ''}"
        status = ProjectStatus(namespace=name, usage=self._usage(obj, name), bound=bound)
        if not obj.spec.enabled:
            # A disabled project is in the state asked for (its members bound to
            # nothing, its resources kept), so kstatus sees it Current: Ready
            # True, with the reason saying why nobody can use it.
            return Outcome.ready(
                status,
                f"{summary}; disabled: members have no access, resources are kept",
                reason="Disabled",
                requeue_after=again,
            )
        return Outcome.ready(status, summary, requeue_after=again)

    # --- who may use it ------------------------------------------------------------------

    async def _bindings(self, obj: Project, namespace: str) -> bool:
        """Ours first (who left or went down a role has no access through
        them any more), then what project admins made (see project_access).
        True when nothing needed changing: `status.bound` may then follow
        the spec; until then it keeps whom the bindings were made for."""
        kube = self.op.kube
        for role in ROLES:
            await kube.apply_raw(ROLEBINDINGS, role_binding(obj, role))
        lost = lost_roles(obj)
        accounts = await kube.list_raw(
            SERVICEACCOUNTS, namespace, label_selector=f"{APP_CREDENTIAL_LABEL}=true"
        )
        ended = credentials_to_end(accounts, lost)
        for account in ended:
            meta = account["metadata"]
            try:
                await kube.delete_raw(SERVICEACCOUNTS, meta["name"], namespace, uid=meta["uid"])
            except ApiError as e:
                if not e.conflict:  # made again under the same name: not this one
                    raise
            log.info("application credential ended with its creator's role", name=meta["name"])
        credentials = {a["metadata"]["name"] for a in accounts if a not in ended}
        settled = not ended
        for binding in await kube.list_raw(ROLEBINDINGS, namespace):
            patch = binding_patch(
                binding,
                enabled=obj.spec.enabled,
                lost=lost,
                credentials=credentials,
                namespace=namespace,
            )
            if patch is None:
                continue
            settled = False
            try:
                await kube.patch_raw(ROLEBINDINGS, binding["metadata"]["name"], patch, namespace)
            except ApiError as e:
                if e.status != 404:  # gone meanwhile: nothing to change
                    raise
        return settled

    # --- quota usage and the ledger's deletions ---------------------------------------

    def _usage(self, obj: Project, namespace: str) -> ProjectUsage:
        # Keyed by ProjectUsage's field names (a unit test checks every quota has one).
        usage: dict[str, UsageItem] = {}
        quotas = obj.spec.quotas
        for field, kind in quota.COUNTED:
            used = len(self.op.store(kind).by_index("quota-namespace", namespace))
            usage[field] = quota.usage_summary(used, quota.limit_of(quotas, field))
        sums = quota.totals(obj.status.reservations)
        for field in quota.SUMMED:
            usage[field] = quota.usage_summary(sums.get(field), quota.limit_of(quotas, field))
        return ProjectUsage(**usage)

    async def _drop_gone(self, obj: Project, namespace: str) -> None:
        """Give back what deleted consumers held. The cache suggests who is gone;
        a live listing confirms it (another shard may have reserved for an
        object this process has not seen yet)."""
        missing: dict[str, set[str]] = {}
        for uid, entry in obj.status.reservations.items():
            kind = quota.CONSUMER_KINDS.get(entry.kind)
            if kind is None or not self.op.store(kind).by_index("quota-uid", uid):
                missing.setdefault(entry.kind, set()).add(uid)
        if not missing:
            return
        gone: set[str] = set()
        for kind_name, uids in missing.items():
            kind = quota.CONSUMER_KINDS.get(kind_name)
            if kind is None:
                gone |= uids
                continue
            live = await self.op.kube.list_raw(path_of(kind), namespace)
            gone |= uids - {o["metadata"]["uid"] for o in live}
        if gone:
            await quota.drop(self.op, obj, gone)
