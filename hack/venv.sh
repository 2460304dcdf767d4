#!/usr/bin/env bash
# Create .venv and install nubes (editable, strict link tree) with dev tools.
# Re-installs only when pyproject.toml, setup.py or the set of modules changed,
# since the link tree must learn about new modules.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv=${VENV:-.venv}
python=${PYTHON:-python3}
stamp=$venv/.nubes-install
want=$( { sha256sum pyproject.toml setup.py; find runtime api controllers drivers agent -name '*.py' -o -name 'py.typed' | sort; } | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then exit 0; fi
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip >/dev/null
# libvirt-python compiles against the node's libvirt headers.
"$venv/bin/pip" install -q -e '.[dev]' --config-settings editable_mode=strict
echo "$want" > "$stamp"
echo "venv: installed nubes into $venv" >&2
