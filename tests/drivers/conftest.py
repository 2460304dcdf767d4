"""Driver tests: real node daemons and tools (libvirtd, QEMU, OVS, dnsmasq,
tgtd, qemu-img), no API server. Each test cleans up what it creates."""
