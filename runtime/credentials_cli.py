"""`nubes credentials` and `nubes app-credential`: the command-line side of
runtime/credentials.py (argument parsing, one API client per run, exit codes)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from nubes.runtime import credentials as cred
from nubes.runtime.kube import ApiError, Kube
from nubes.runtime.kubeconfig import KubeconfigError

T = TypeVar("T")

ISSUE_HELP = """Issue a kubeconfig for USER scoped to PROJECT: a client certificate
(CN=USER, O=each --group) signed through the CertificateSigningRequest API,
valid for --duration (24h by default, as a Keystone token; at least 10m),
whose context's namespace is the project's. Run as a cloud admin: it creates
and approves a CSR for signer kubernetes.io/kube-apiserver-client, which is
the power to authenticate as anyone; system: users and groups are refused.
The certificate only authenticates: it grants something in the project only
while the project's spec.members lists USER (or one of the groups)."""

APP_HELP = """Application credentials: a ServiceAccount in the project's
namespace bound to one project role, with a token of limited life. A project
admin runs these with their own kubeconfig. The controller deletes the
credential when --duration is over (checked every 2 seconds; any life of at
least 10s, although the token itself says at least 10 minutes, the API
server's minimum), and with it every token issued for it."""


def _run(kubeconfig: str | None, work: Callable[[Kube], Awaitable[T]]) -> T:
    async def main() -> T:
        kube = await Kube.connect(kubeconfig, field_manager="nubes-credentials")
        try:
            return await work(kube)
        finally:
            await kube.close()

    return asyncio.run(main())


def _fail(e: Exception) -> int:
    if isinstance(e, ApiError):
        print(f"nubes: the API server refused ({e.status}): {e}", file=sys.stderr)
    else:
        print(f"nubes: {e}", file=sys.stderr)
    return 1


def issue(args: argparse.Namespace) -> int:
    try:
        seconds = cred.parse_duration(args.duration)
        cluster = cred.current_cluster(args.kubeconfig)
        expires = _run(
            args.kubeconfig,
            lambda kube: cred.issue_kubeconfig(
                kube,
                cluster,
                user=args.user,
                project=args.project,
                groups=args.group,
                seconds=seconds,
                out=Path(args.output),
            ),
        )
    except (cred.CredentialError, ApiError, KubeconfigError) as e:
        return _fail(e)
    print(f"{args.output}: {args.user} in project {args.project}, expires {expires}")
    return 0


def app_create(args: argparse.Namespace) -> int:
    try:
        seconds = cred.parse_duration(args.duration, cred.APP_MIN_DURATION)
        cluster = cred.current_cluster(args.kubeconfig)
        expires = _run(
            args.kubeconfig,
            lambda kube: cred.create_app_credential(
                kube,
                cluster,
                project=args.project,
                name=args.name,
                role=args.role,
                seconds=seconds,
                out=Path(args.output),
            ),
        )
    except (cred.CredentialError, ApiError, KubeconfigError) as e:
        return _fail(e)
    print(f"{args.output}: {args.name} ({args.role}) in project {args.project}, expires {expires}")
    return 0


def app_delete(args: argparse.Namespace) -> int:
    try:
        gone = _run(
            args.kubeconfig,
            lambda kube: cred.delete_app_credential(kube, project=args.project, name=args.name),
        )
    except (cred.CredentialError, ApiError, KubeconfigError) as e:
        return _fail(e)
    if not gone:
        print(f"nubes: no application credential {args.name} in project {args.project}")
        return 1
    print(f"{args.name} deleted: its tokens no longer authenticate")
    return 0


def app_list(args: argparse.Namespace) -> int:
    try:
        found = _run(
            args.kubeconfig, lambda kube: cred.list_app_credentials(kube, project=args.project)
        )
    except (cred.CredentialError, ApiError, KubeconfigError) as e:
        return _fail(e)
    for name, role, expires in found:
        print(f"{name}\t{role}\t{expires}")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("credentials", help="issue a user a kubeconfig scoped to a project")
    csub = c.add_subparsers(dest="action", required=True)
    i = csub.add_parser(
        "issue", help="cloud admin: a client certificate kubeconfig", description=ISSUE_HELP
    )
    i.add_argument("--kubeconfig", help="the cloud admin's (default: KUBECONFIG, .nubes/)")
    i.add_argument("--user", required=True)
    i.add_argument("--project", required=True)
    i.add_argument("--group", action="append", default=[], help="repeatable")
    i.add_argument("--duration", default="24h", help="e.g. 90m, 24h, 7d (default 24h)")
    i.add_argument("-o", "--output", required=True, help="kubeconfig to write (mode 0600)")
    i.set_defaults(func=issue)

    a = sub.add_parser(
        "app-credential", help="project admin: application credentials", description=APP_HELP
    )
    asub = a.add_subparsers(dest="action", required=True)
    create = asub.add_parser("create", help="a ServiceAccount with a role, and a token kubeconfig")
    delete = asub.add_parser("delete", help="revoke: delete the ServiceAccount and its binding")
    listing = asub.add_parser("list", help="the project's application credentials and roles")
    for p in (create, delete, listing):
        p.add_argument("--kubeconfig", help="the project admin's (default: KUBECONFIG, .nubes/)")
        p.add_argument("--project", required=True)
    for p in (create, delete):
        p.add_argument("--name", required=True)
    create.add_argument("--role", choices=cred.ROLES, default="member")
    create.add_argument("--duration", default="24h", help="life, e.g. 30s, 90m, 24h (default 24h)")
    create.add_argument("-o", "--output", required=True, help="kubeconfig to write (mode 0600)")
    create.set_defaults(func=app_create)
    delete.set_defaults(func=app_delete)
    listing.set_defaults(func=app_list)
