# Shared shell helpers for the Nubes test guest (sourced, not run).

say() { echo "nubes-guest: $*"; }

uptime_s() { cut -d' ' -f1 /proc/uptime; }

# "NAME SIZE_BYTES" for every virtio/SCSI disk, sorted by name.
list_disks() {
  for d in /sys/block/vd* /sys/block/sd*; do
    [ -e "$d/size" ] || continue
    echo "${d##*/} $(( $(cat "$d/size") * 512 ))"
  done
}

# The disk whose ISO 9660 volume id is config-2 (the image carries isofs only).
find_config_drive() {
  for d in /sys/block/vd* /sys/block/sd* /sys/block/sr*; do
    [ -e "$d" ] || continue
    dev=/dev/${d##*/}
    if [ "$(dd if="$dev" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] &&
       [ "$(dd if="$dev" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' ')" = config-2 ]; then
      echo "${d##*/}"; return 0
    fi
  done
  return 1
}

# The value of a top-level string member of the JSON on stdin (flat enough
# for the config drive's meta_data.json; no escapes inside values).
json_string() {
  tr -d '\n' | sed -n "s/.*\"$1\"[[:space:]]*:[[:space:]]*\"\([^\"]*\)\".*/\1/p"
}

# /dev/vdb, vdb -> vdb
disk_name() { n=${1#/dev/}; echo "$n"; }
