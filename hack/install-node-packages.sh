#!/usr/bin/env bash
# Install the Debian packages the node agent drives. Idempotent: installs only
# what is missing, so a warm machine pays one dpkg query.
set -euo pipefail
packages=(
  qemu-system-x86 qemu-utils qemu-block-extra
  libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
  openvswitch-switch dnsmasq-base dnsmasq-utils tgt libiscsi-bin open-iscsi lvm2
  busybox-static linux-image-cloud-amd64 extlinux syslinux syslinux-common mtools genisoimage
  iptables ipset conntrack ethtool iproute2 procps psmisc cpio gzip xz-utils parted dosfstools
  e2fsprogs kmod curl
  # The local cluster's node (hack/node.sh), the image build (hack/image.sh),
  # the Argo CD health check tests (Lua).
  containerd runc containernetworking-plugins mmdebstrap lua5.4
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install-node-packages: all ${#packages[@]} packages present"
  exit 0
fi
echo "install-node-packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# Daemons are started by hack/start-node-daemons.sh; keep package scripts from
# trying to start services on a machine without an init system.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq --no-install-recommends "${missing[@]}"
