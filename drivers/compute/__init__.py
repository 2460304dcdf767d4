"""Node-local compute: libvirt domains, their XML and config drives."""
