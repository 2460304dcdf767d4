#!/usr/bin/env bash
# Build the tiny Nubes test guest: an MBR disk whose one FAT partition holds
# SYSLINUX, the Debian cloud kernel and a busybox-static initramfs (the guest
# runs from the initramfs; there is no root partition). See rootfs/ for what
# the guest does at boot.
#
#   hack/guest-image/build.sh        # prints the qcow2 path on its last line
#
# Cached by the hash of its inputs (kernel, modules, busybox, syslinux, these
# scripts) in ${NUBES_CACHE:-$HOME/.cache/nubes}/guest/KEY/; a warm call only
# hashes. No loop mounts: mtools writes the FAT filesystem, `syslinux` installs
# into it from the image file. Needs root only for mknod of /dev/console in
# the initramfs staging tree.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${NUBES_CACHE:-$HOME/.cache/nubes}/guest
kver=${NUBES_GUEST_KERNEL:-$(basename "$(ls /boot/vmlinuz-*-cloud-amd64 | sort -V | tail -1)" | sed 's/^vmlinuz-//')}
kernel=/boot/vmlinuz-$kver
busybox=/bin/busybox
syslinux_dir=/usr/lib/syslinux
# Drivers for virtio disks and NICs, the config drive (iso9660), the ACPI
# power button (button + evdev for acpid); ext2 data disks use the built-in ext4.
modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
  failover net_failover virtio_net virtio_blk isofs button evdev)
disk_mib=64

log() { echo "guest-image: $*" >&2; }
[[ -r $kernel ]] || { log "no kernel $kernel (install linux-image-cloud-amd64)"; exit 1; }
[[ -x $busybox ]] && "$busybox" --list | grep -x udhcpc >/dev/null || { log "$busybox is not busybox-static"; exit 1; }

# Module files in load order: modprobe resolves dependencies without loading.
module_files() {
  local m
  for m in "${modules[@]}"; do
    modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
  done | awk '!seen[$0]++'
}
mapfile -t kos < <(module_files)

key=$(
  {
    echo "kernel $kver"; sha256sum "$kernel" "${kos[@]}"
    dpkg-query -W -f='${Package} ${Version}\n' busybox-static syslinux syslinux-common 2>/dev/null || true
    sha256sum "$busybox" "$syslinux_dir/mbr/mbr.bin"
    echo "modules ${modules[*]} disk $disk_mib"
    cd "$here" && find . -type f | LC_ALL=C sort | xargs sha256sum
    find . -type f -perm -u+x | LC_ALL=C sort
  } | sha256sum | cut -c1-16
)
out=$cache/$key/nubes-guest.qcow2
if [[ -f $out ]]; then echo "$out"; exit 0; fi

mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9
if [[ -f $out ]]; then echo "$out"; exit 0; fi
log "building $key (kernel $kver)"
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- initramfs: busybox applets, the rootfs overlay, the modules -------------
stage=$work/initramfs
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,mnt,etc,lib/modules}
# The overlay goes in first: the applet links point at /bin/busybox, and
# copying over such a link would write through it into the host's busybox.
cp -a "$here/rootfs/." "$stage/"
cp "$busybox" "$stage/bin/busybox"
while read -r applet; do
  [[ -e $stage/$applet || -L $stage/$applet ]] || ln -s /bin/busybox "$stage/$applet"
done < <("$busybox" --list-full)
ln -s /bin/busybox "$stage/init"
mknod -m 600 "$stage/dev/console" c 5 1
mknod -m 666 "$stage/dev/null" c 1 3
: > "$stage/etc/modules.order"
for ko in "${kos[@]}"; do
  cp "$ko" "$stage/lib/modules/"
  basename "$ko" >> "$stage/etc/modules.order"
done
(cd "$stage" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -9 -n) > "$work/initrd.img"

# --- boot partition: FAT with SYSLINUX, written without mounting -------------
cat > "$work/syslinux.cfg" <<CFG
SERIAL 0 115200
DEFAULT nubes
PROMPT 0
TIMEOUT 0
LABEL nubes
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND console=ttyS0,115200 quiet loglevel=3 8250.nr_uarts=1 random.trust_cpu=on
CFG
part_start=2048  # sectors: the first partition at 1 MiB
part_sectors=$(( disk_mib * 2048 - part_start ))
fat=$work/boot.fat
truncate -s $(( part_sectors * 512 )) "$fat"
# -h: hidden sectors = partition offset, which the SYSLINUX boot sector needs.
mkfs.vfat -F 16 -n NUBESBOOT -h "$part_start" "$fat" >/dev/null
export MTOOLS_SKIP_CHECK=1
mcopy -i "$fat" "$kernel" ::/vmlinuz
mcopy -i "$fat" "$work/initrd.img" ::/initrd.img
mcopy -i "$fat" "$work/syslinux.cfg" ::/syslinux.cfg
syslinux --install "$fat"

disk=$work/disk.raw
truncate -s "${disk_mib}M" "$disk"
parted -s "$disk" mklabel msdos mkpart primary fat16 "${part_start}s" 100% set 1 boot on
dd if="$syslinux_dir/mbr/mbr.bin" of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$fat" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none

mkdir -p "$work/out"
qemu-img convert -f raw -O qcow2 "$disk" "$work/out/nubes-guest.qcow2"
rm -rf "${cache:?}/$key"
mv "$work/out" "$cache/$key"
log "built $out"
echo "$out"
