"""Node networking: Open vSwitch bridges and flows, network namespaces and
veths, VIF plugging, and dnsmasq DHCP servers."""
