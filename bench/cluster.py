"""What every benchmark needs of the cluster KUBECONFIG names: the CRDs, as
`make demo` installs them (a cluster started for the run is empty)."""

from __future__ import annotations

import os
from pathlib import Path

from nubes.drivers.runner import SubprocessRunner

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = Path(os.environ.get("NUBES_CACHE", Path.home() / ".cache" / "nubes")) / "bin" / "kubectl"


def install_crds() -> None:
    apply = [str(KUBECTL), "apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds")]
    SubprocessRunner()(apply, timeout=120)
    wait = [str(KUBECTL), "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s"]
    SubprocessRunner()(wait, timeout=90)
