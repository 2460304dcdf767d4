#!/usr/bin/env bash
# The Nubes container image and the pod sandbox (pause) image, assembled
# without a registry or container engine: a Debian bookworm root filesystem
# from Debian's packages (mmdebstrap) with the node tools the agent drives,
# plus a layer holding a virtualenv with the nubes wheel and its pinned
# dependencies. Both are OCI archives cached under $NUBES_CACHE/images by the
# digest of their inputs (package list, this script, the sources, the pinned
# Python dependencies): unchanged inputs reuse the archive.
#
#   hack/image.sh ref              print the image reference (nubes.local/nubes:<digest>)
#   hack/image.sh build            build if missing; print the archive path
#   hack/image.sh pause            build the pause image if missing; print the archive path
#   hack/image.sh load SOCKET      build both, import them into the containerd at SOCKET
#                                  (unless there already); print the nubes image reference
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cache=${NUBES_CACHE:-$HOME/.cache/nubes}
images=$cache/images
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1767225600}   # 2026-01-01: fixed times in every layer
PAUSE_REF=nubes.local/pause:1
log() { echo "image: $*" >&2; }
# The image takes its pinned versions and wheel from this tree's virtualenv;
# without one (a fresh worktree) it would be built without Nubes in it.
if [[ ! -x $root/.venv/bin/pip ]]; then
  log "$root/.venv is missing: run hack/venv.sh first"
  exit 1
fi

# What the agent runs on the node (see drivers/): kept in step with
# hack/install-node-packages.sh. python3-venv for the virtualenv, libvirt0
# for libvirt-python.
packages=(
  python3 python3-venv libvirt0 libvirt-clients
  qemu-utils qemu-block-extra qemu-system-x86
  openvswitch-switch openvswitch-common dnsmasq-base tgt open-iscsi lvm2
  iptables ipset ebtables conntrack iproute2 ethtool genisoimage util-linux kmod procps e2fsprogs
  ca-certificates curl
)

sha() { sha256sum | cut -c1-16; }

base_key() {
  { printf '%s\n' "${packages[@]}"; sed -n '/^build_base()/,/^}/p' "$0"; } | sha
}

source_files() {
  (cd "$root" && git ls-files -co --exclude-standard -- pyproject.toml setup.py README.md \
    runtime api controllers drivers agent | while read -r f; do [[ -f $f ]] && echo "$f"; done)
}

constraints() { # the versions the development virtualenv was tested with
  "$root/.venv/bin/pip" freeze --exclude-editable 2>/dev/null | grep -v '^-e ' | grep -iv '^nubes=' || true
}

app_key() {
  {
    base_key
    sed -n '/^build_app()/,/^}/p' "$0"
    sha256sum "$here/image/oci_archive.py"
    constraints
    (cd "$root" && source_files | xargs -d '\n' sha256sum)
  } | sha
}

ref() { echo "nubes.local/nubes:$(app_key)"; }

build_base() { # -> $images/base-KEY (a root filesystem directory)
  local key; key=$(base_key)
  local out=$images/base-$key
  [[ -f $out/.complete ]] && { echo "$out"; return; }
  rm -rf "$out" "$out.tmp"
  log "building the Debian root filesystem ($key; a few minutes on a cold cache)"
  # The agent gives guest files to QEMU's user and group by name (drivers/
  # hostfiles.py), as the host's libvirtd runs QEMU: Debian's libvirt-qemu,
  # whose static id is 64055 (the image has no libvirt daemon to create it).
  local qemu_user_hook='echo "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin" >> "$1/etc/passwd"; echo "libvirt-qemu:x:64055:libvirt-qemu" >> "$1/etc/group"'
  mkdir -p "$images"
  # Without docs, man pages and locales; apt lists dropped; no apt in the image.
  nice -n 19 mmdebstrap --variant=essential --mode=root --quiet \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/cache/* "$1"/var/lib/apt/lists/* "$1"/var/log/*' \
    --customize-hook="$qemu_user_hook" \
    bookworm "$out.tmp" "deb http://deb.debian.org/debian bookworm main" \
    "deb http://deb.debian.org/debian bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" >&2
  touch "$out.tmp/.complete"
  mv "$out.tmp" "$out"
  # Root filesystems of older package lists go.
  find "$images" -maxdepth 1 -name 'base-*' ! -name "base-$key" -exec rm -rf {} +
  echo "$out"
}

build_app() { # base -> directory holding the virtualenv at /opt/nubes
  local base=$1 work=$2
  mkdir -p "$work/src" "$work/wheels"
  (cd "$root" && source_files | xargs -d '\n' cp --parents -t "$work/src")
  constraints > "$work/constraints.txt"
  # Wheels built by the host's Python (the same bookworm python3.11 and
  # libvirt 9.0 as the image); pip's cache keeps this fast when warm.
  nice -n 19 "$root/.venv/bin/pip" wheel -q -w "$work/wheels" -c "$work/constraints.txt" "$work/src" >&2
  # The virtualenv is made inside the image's root filesystem so that its
  # interpreter path is the image's; the base stays untouched (bind mounts).
  mkdir -p "$work/opt" "$base/opt/nubes" "$base/tmp/wheels"
  mount --bind "$work/opt" "$base/opt/nubes"
  mount --bind "$work/wheels" "$base/tmp/wheels"
  local rc=0
  chroot "$base" /usr/bin/python3 -m venv /opt/nubes >&2 || rc=$?
  ((rc)) || chroot "$base" /opt/nubes/bin/pip install -q --no-index --no-cache-dir \
    --disable-pip-version-check --find-links /tmp/wheels nubes >&2 || rc=$?
  umount "$base/tmp/wheels" "$base/opt/nubes"
  rmdir "$base/tmp/wheels" "$base/opt/nubes"
  return $rc
}

build() {
  local key; key=$(app_key)
  local out=$images/nubes-$key.tar
  if [[ -f $out ]]; then echo "$out"; return; fi
  exec 9>"$images.lock"; flock 9
  if [[ -f $out ]]; then echo "$out"; return; fi
  local base; base=$(build_base)
  local work; work=$(mktemp -d "$images/app.XXXX")
  trap 'rm -rf "$work"' RETURN
  log "building nubes.local/nubes:$key"
  build_app "$base" "$work"
  # Drop the base's marker from the layer; pip's compiled files are
  # reproducible under SOURCE_DATE_EPOCH (checked-hash pycs).
  python3 "$here/image/oci_archive.py" "$out" "nubes.local/nubes:$key" \
    --layer "$base" --layer "$work/opt=opt/nubes" \
    --env PATH=/opt/nubes/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --entrypoint /opt/nubes/bin/nubes >/dev/null
  # Keep the cache small: older archives of this image go.
  find "$images" -maxdepth 1 -name 'nubes-*.tar' ! -name "nubes-$key.tar" -delete
  echo "$out"
}

pause() {
  local key; key=$( { sha256sum "$here/image/pause/main.go" "$here/image/oci_archive.py"; go version; } | sha)
  local out=$images/pause-$key.tar
  if [[ -f $out ]]; then echo "$out"; return; fi
  mkdir -p "$images"
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  (cd "$here/image/pause" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$work/fs/pause" .)
  python3 "$here/image/oci_archive.py" "$out" "$PAUSE_REF" --layer "$work/fs" --entrypoint /pause >/dev/null
  echo "$out"
}

load() { # containerd socket; prints the reference of the imported nubes image
  local sock=$1 archive name
  for archive in "$(pause)" "$(build)"; do
    # nubes-KEY.tar holds nubes.local/nubes:KEY (the sources may change
    # while this runs: the reference is the archive's, not a new digest).
    name=$(basename "$archive" .tar)
    case $name in
      nubes-*) name=nubes.local/nubes:${name#nubes-} ;;
      pause-*) name=$PAUSE_REF ;;
    esac
    ctr -a "$sock" -n k8s.io images ls -q | grep -qx "$name" \
      || ctr -a "$sock" -n k8s.io images import "$archive" >&2
  done
  echo "$name"
}

case ${1:-} in
  ref) ref ;;
  build) build ;;
  pause) pause ;;
  load) load "${2:?containerd socket}" ;;
  *) echo "usage: $0 ref|build|pause|load SOCKET" >&2; exit 2 ;;
esac
