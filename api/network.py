"""network.nubes.io: the Neutron model (networks, subnets, ports, L3, security).

(About 860 lines: the Neutron kinds' models and the user documentation
shipped in their CRDs; ports, subnets, routers, floating IPs and security
groups reference one another.)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from .meta import (
    AGE_COLUMN,
    CATEGORY,
    READY_COLUMN,
    REASON_COLUMN,
    ApiModel,
    CrdInfo,
    Immutable,
    LocalRef,
    PrinterColumn,
    ProjectRef,
    Resource,
    Rule,
    Status,
    cel,
    validations,
)

GROUP = "network.nubes.io"
CATEGORIES = (CATEGORY, "neutron")

NetworkType = Literal["local", "flat", "vlan", "vxlan", "gre"]

MAC_PATTERN = r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"
# A port's MAC is a guest NIC's source address: a multicast (group bit set in
# the first octet) or all-zero MAC would be refused by libvirt or break
# forwarding for the whole segment, so the API server refuses it.
MAC = Annotated[
    str,
    Field(pattern=MAC_PATTERN, max_length=17),
    Rule(
        "!self.matches('^[0-9a-fA-F][13579bdfBDF]:')",
        message_expression="'\"' + self + '\" is a multicast MAC address (the first octet is odd)'",
    ),
    Rule(
        "self != '00:00:00:00:00:00'",
        "00:00:00:00:00:00 is not a usable MAC address",
    ),
]
# 0a:4e:… is where Nubes derives ports' MACs from their IPv4 addresses
# (controllers/ipam.py): a MAC given there could take another port's.
PORT_MAC = Annotated[
    MAC,
    Rule(
        "!self.matches('^0[aA]:4[eE]:')",
        message_expression="'\"' + self + '\" is in 0a:4e:..., the range of MACs derived"
        " from the IPv4 addresses of ports; choose another'",
    ),
]
NAME = Annotated[str, Field(min_length=1, max_length=253)]
IP = Annotated[
    str,
    Field(max_length=45),
    Rule("isIP(self)", message_expression="'\"' + self + '\" is not an IP address'"),
]
IP_OR_CIDR = Annotated[
    str,
    Field(max_length=49),
    Rule(
        "isIP(self) || isCIDR(self)",
        message_expression="'\"' + self + '\" is neither an IP address nor a CIDR'",
    ),
]
CIDR = Annotated[
    str,
    Field(max_length=49),
    Rule(
        "isCIDR(self)",
        message_expression="'\"' + self + '\" is not a CIDR such as 10.0.0.0/24'",
    ),
]


def _ipv4_int(expr: str) -> str:
    """CEL for the integer value of a dotted-quad IPv4 string."""
    octets = [f"int({expr}.split('.')[{i}])" for i in range(4)]
    return f"({octets[0]} * 16777216 + {octets[1]} * 65536 + {octets[2]} * 256 + {octets[3]})"


# --- Network -----------------------------------------------------------------


class NetworkSpec(ApiModel):
    """A layer-2 broadcast domain owned by a project."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!(self.type in ['local', 'flat']) || !has(self.segmentationId)",
                message_expression="'segmentationId cannot be set for a ' + self.type + ' network'",
                field_path=".segmentationId",
            ),
            cel(
                "self.type != 'vlan' || !has(self.segmentationId) || "
                "(self.segmentationId >= 1 && self.segmentationId <= 4094)",
                "segmentationId of a vlan network (VLAN id) must be within 1..4094",
                field_path=".segmentationId",
            ),
            cel(
                "self.type != 'vxlan' || !has(self.segmentationId) || "
                "(self.segmentationId >= 1 && self.segmentationId <= 16777215)",
                "segmentationId of a vxlan network (VNI) must be within 1..16777215",
                field_path=".segmentationId",
            ),
            cel(
                "(self.type in ['flat', 'vlan']) == has(self.physicalNetwork)",
                "physicalNetwork is required for flat and vlan networks and "
                "not allowed for local, vxlan and gre networks",
                field_path=".physicalNetwork",
            ),
            cel(
                "has(self.segmentationId) == has(oldSelf.segmentationId)",
                "segmentationId is immutable",
                field_path=".segmentationId",
            ),
            cel(
                "has(self.physicalNetwork) == has(oldSelf.physicalNetwork)",
                "physicalNetwork is immutable",
                field_path=".physicalNetwork",
            ),
        )
    )

    type: Annotated[NetworkType, Immutable("type")] = "vxlan"
    """Network type: local (one node only), flat (untagged provider network),
    vlan (802.1q on a provider network), vxlan or gre (overlay tunnels)."""
    segmentation_id: Annotated[
        int | None, Field(ge=1, le=4294967295), Immutable("segmentationId")
    ] = None
    """VLAN id (1..4094), VXLAN VNI (1..16777215) or GRE key. Allocated from the
    configured range when not given; only administrators may request one."""
    physical_network: Annotated[
        str | None, Field(min_length=1, max_length=64), Immutable("physicalNetwork")
    ] = None
    """Provider network name (flat and vlan only), mapped to a bridge on each node."""
    mtu: int | None = Field(default=None, ge=576, le=9000)
    """Requested MTU. Must not exceed what the type allows on the underlay
    (e.g. 1450 for vxlan and 1458 for gre over a 1500-byte underlay)."""
    shared: bool = False
    """Visible to and usable by every project."""
    external: bool = False
    """Router gateways and floating IPs may use this network."""
    admin_state_up: bool = True
    """When false, ports on the network do not forward traffic."""
    port_security_enabled: bool = True
    """Default for ports created on this network."""
    availability_zone_hints: list[Annotated[str, Field(min_length=1, max_length=255)]] = Field(
        default_factory=list, max_length=16
    )
    """Run the network's DHCP server on a node of one of these zones."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class NetworkDhcpStatus(ApiModel):
    """Written by the agent of the network's DHCP node."""

    node: str
    """Node that reports."""
    running: bool = False
    """True once the DHCP server serves the network's current settings."""
    error: str = ""
    """Why the DHCP server could not be set up (e.g. dnsmasq's own message)."""


class NetworkStatus(Status):
    segmentation_id: int | None = None
    """The segmentation id in effect."""
    mtu: int | None = None
    """The MTU in effect, derived from the type and the underlay MTU."""
    dhcp_node: str | None = None
    """Node whose agent serves DHCP for this network."""
    dhcp_port: str | None = None
    """Name of the Port the DHCP server uses."""
    dhcp: NetworkDhcpStatus | None = None
    """State of the DHCP server, reported by the DHCP node's agent."""
    ports: int | None = None
    """Number of ports on the network."""


class Network(Resource[NetworkSpec, NetworkStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="Network",
        plural="networks",
        short_names=("net",),
        categories=CATEGORIES,
        description="A Neutron network: an isolated layer-2 segment.",
        printer_columns=(
            PrinterColumn("Type", ".spec.type"),
            PrinterColumn("Segment", ".status.segmentationId", "integer"),
            PrinterColumn("MTU", ".status.mtu", "integer"),
            PrinterColumn("Shared", ".spec.shared", "boolean", priority=1),
            PrinterColumn("External", ".spec.external", "boolean", priority=1),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: NetworkSpec = Field(default_factory=NetworkSpec)
    status: NetworkStatus = Field(default_factory=NetworkStatus)


# --- Subnet ------------------------------------------------------------------


class AllocationPool(ApiModel):
    """An inclusive range of addresses handed out to ports."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!isIP(self.start) || !isIP(self.end)"
                " || ip(self.start).family() == ip(self.end).family()",
                "start and end of an allocation pool must be of the same IP family",
            ),
            # CEL has no IP ordering: compare IPv4 numerically; the controller
            # checks IPv6 pools.
            cel(
                "!isIP(self.start) || !isIP(self.end) || ip(self.start).family() != 4"
                " || ip(self.end).family() != 4"
                f" || {_ipv4_int('self.start')} <= {_ipv4_int('self.end')}",
                message_expression="'allocation pool is reversed: start ' + self.start"
                " + ' is after end ' + self.end",
            ),
        )
    )

    start: IP
    """First address of the pool."""
    end: IP
    """Last address of the pool."""


class HostRoute(ApiModel):
    """A static route pushed to guests by DHCP (option 121)."""

    destination: Annotated[
        CIDR,
        Rule(
            "!isCIDR(self) || cidr(self).masked() == cidr(self)",
            message_expression="'destination ' + self + ' has host bits set'",
        ),
    ]
    """Destination CIDR."""
    nexthop: IP
    """Next-hop address."""


class SubnetSpec(ApiModel):
    """An IP address block on a network, with its DHCP settings."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!isCIDR(self.cidr) || cidr(self.cidr).ip().family() == self.ipVersion",
                message_expression="'cidr ' + self.cidr + ' is not of the subnet\\'s ipVersion'",
                field_path=".cidr",
            ),
            cel(
                "!isCIDR(self.cidr) || cidr(self.cidr).masked() == cidr(self.cidr)",
                message_expression="'cidr ' + self.cidr + ' has host bits set (the address must"
                " be the network address of the prefix)'",
                field_path=".cidr",
            ),
            cel(
                "!has(self.gatewayIp) || !isIP(self.gatewayIp) || !isCIDR(self.cidr)"
                " || cidr(self.cidr).containsIP(self.gatewayIp)",
                message_expression="'gatewayIp ' + self.gatewayIp"
                " + ' is outside cidr ' + self.cidr",
                field_path=".gatewayIp",
            ),
            cel(
                "!(has(self.gatewayIp) && self.noGateway)",
                "gatewayIp cannot be set together with noGateway",
                field_path=".gatewayIp",
            ),
            cel(
                "!has(self.allocationPools) || !isCIDR(self.cidr) || self.allocationPools.all(p, "
                "!isIP(p.start) || !isIP(p.end) || "
                "(cidr(self.cidr).containsIP(p.start) && cidr(self.cidr).containsIP(p.end)))",
                message_expression="'allocationPools must lie inside cidr ' + self.cidr",
                field_path=".allocationPools",
            ),
            cel(
                "!has(self.hostRoutes) || self.hostRoutes.all(r, "
                "!isCIDR(r.destination) || !isIP(r.nexthop) || "
                "(cidr(r.destination).ip().family() == self.ipVersion"
                " && ip(r.nexthop).family() == self.ipVersion))",
                "hostRoutes must be of the subnet's IP version",
                field_path=".hostRoutes",
            ),
            # dnsmasq refuses an option carrying an address of the other
            # family and does not start, so this is checked here.
            cel(
                "!has(self.dnsNameservers) || self.dnsNameservers.all(d, "
                "!isIP(d) || ip(d).family() == self.ipVersion)",
                "dnsNameservers must be of the subnet's IP version",
                field_path=".dnsNameservers",
            ),
            # A next hop outside the cidr is allowed, as in Neutron (it only
            # checks the IP version): some designs route via the host.
        )
    )

    network: Annotated[LocalRef, Immutable("network")]
    """The network this subnet belongs to (in the same project)."""
    ip_version: Annotated[Literal[4, 6], Immutable("ipVersion")] = 4
    """4 or 6."""
    cidr: Annotated[CIDR, Immutable("cidr")]
    """The address block, e.g. 10.0.0.0/24."""
    gateway_ip: IP | None = None
    """Router address on this subnet; defaults to the first host address."""
    no_gateway: bool = False
    """Do not configure a gateway (no default route for guests)."""
    allocation_pools: list[AllocationPool] | None = Field(default=None, max_length=32)
    """Ranges ports are allocated from; defaults to the whole CIDR minus the
    network, broadcast and gateway addresses."""
    dns_nameservers: list[IP] = Field(
        default_factory=list, max_length=5, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """DNS servers announced by DHCP (at most 5, no duplicates, as Neutron)."""
    # 20 is Neutron's max_subnet_host_routes; it also keeps option 121 (at
    # most 9 bytes a route, plus the default route) within the 255 bytes a
    # DHCP option holds: dnsmasq refuses to start with a longer one.
    host_routes: list[HostRoute] = Field(
        default_factory=list,
        max_length=20,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["destination", "nexthop"],
        },
    )
    """Static routes announced by DHCP (option 121), at most 20, no duplicates."""
    enable_dhcp: bool = True
    """Serve this subnet's addresses by DHCP."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class SubnetStatus(Status):
    gateway_ip: str | None = None
    """Gateway in effect."""
    allocation_pools: list[AllocationPool] = Field(default_factory=list)
    """Pools in effect."""
    capacity: int | None = None
    """Number of allocatable addresses."""
    used: int | None = None
    """Number of allocated addresses."""


class Subnet(Resource[SubnetSpec, SubnetStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="Subnet",
        plural="subnets",
        short_names=("sn",),
        categories=CATEGORIES,
        description="A Neutron subnet: an address block with IPAM and DHCP settings.",
        printer_columns=(
            PrinterColumn("Network", ".spec.network.name"),
            PrinterColumn("CIDR", ".spec.cidr"),
            PrinterColumn("Gateway", ".status.gatewayIp"),
            PrinterColumn("Used", ".status.used", "integer", priority=1),
            PrinterColumn("Capacity", ".status.capacity", "integer", priority=1),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: SubnetSpec
    status: SubnetStatus = Field(default_factory=SubnetStatus)


# --- Port --------------------------------------------------------------------


class FixedIpRequest(ApiModel):
    """An address wanted on a port: any free one of a subnet, or a given one."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.subnet) || has(self.ipAddress)",
                "a fixedIps entry needs a subnet, an ipAddress or both",
            )
        )
    )

    subnet: str | None = Field(default=None, min_length=1, max_length=253)
    """Subnet name (same namespace as the network)."""
    ip_address: IP | None = None
    """A specific address; must be free."""


class PortBinding(ApiModel):
    """Where the port is plugged."""

    host: str | None = Field(default=None, max_length=253)
    """Node whose agent wires the port into its integration bridge; absent
    means the node of the instance using it. Cloud admins only (verb
    `bind-host` on ports), as Neutron's binding:host_id."""
    vnic_type: Literal["normal"] = "normal"
    """Only normal (virtio/veth) ports are supported."""


class AllowedAddressPair(ApiModel):
    """Extra addresses the port may send from when port security is on."""

    ip_address: IP_OR_CIDR
    """Address or CIDR."""
    mac_address: MAC | None = None
    """MAC; defaults to the port's."""


class PortSpec(ApiModel):
    """A virtual switch port: a MAC and fixed IPs on a network."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.portSecurityEnabled) || self.portSecurityEnabled"
                " || !has(self.securityGroups) || size(self.securityGroups) == 0",
                "securityGroups must be empty when portSecurityEnabled is false",
                field_path=".securityGroups",
            ),
        )
    )

    network: Annotated[ProjectRef, Immutable("network")]
    """Network of the port; another project's network only if shared."""
    mac_address: Annotated[PORT_MAC | None, Immutable("macAddress")] = None
    """MAC address, e.g. fa:16:3e:00:00:01. When not given, derived from the
    port's first IPv4 address (0a:4e and its four octets: 10.0.0.5 gives
    0a:4e:0a:00:00:05), or random in fa:16:3e:… for a port without one."""
    fixed_ips: list[FixedIpRequest] | None = Field(default=None, max_length=16)
    """Addresses wanted. Absent: one address from the first IPv4 and the first
    IPv6 subnet of the network. Empty list: no address."""
    device_owner: str = Field(default="", max_length=255)
    """What uses the port, e.g. compute:nova, network:dhcp, network:router_interface."""
    device_id: str = Field(default="", max_length=255)
    """Identifier of the user of the port (e.g. the Instance uid)."""
    binding: PortBinding = Field(default_factory=PortBinding)
    """Node binding."""
    security_groups: list[NAME] | None = Field(default=None, max_length=32)
    """SecurityGroup names in the port's namespace; absent means the project's default."""
    port_security_enabled: bool | None = None
    """Anti-spoofing and security groups; defaults to the network's setting."""
    allowed_address_pairs: list[AllowedAddressPair] = Field(default_factory=list, max_length=10)
    """Extra source addresses allowed through port security."""
    admin_state_up: bool = True
    """When false the port does not forward traffic."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class FixedIp(ApiModel):
    subnet: str
    """Subnet name."""
    ip_address: str
    """Allocated address."""


class PortBindingStatus(ApiModel):
    """Written by the agent of the bound node."""

    node: str
    """Node that plugged the port."""
    device: str = ""
    """Name of the OVS port of this Port on the integration bridge."""
    local_vlan: int | None = None
    """Local VLAN tag of the network on the node's integration bridge."""
    active: bool = False
    """True once the OVS port carries the network's tag."""


class PortDhcpStatus(ApiModel):
    """Written by the agent serving DHCP for the network."""

    node: str
    """Node running the network's DHCP server."""
    mac_address: str
    """MAC in the DHCP host entry."""
    ip_addresses: list[str] = Field(default_factory=list)
    """Addresses in the DHCP host entry."""


class PortStatus(Status):
    mac_address: str | None = None
    """MAC in effect."""
    fixed_ips: list[FixedIp] = Field(default_factory=list)
    """Addresses allocated to the port."""
    mtu: int | None = None
    """MTU of the network."""
    network_uid: str | None = None
    """Uid of the network, which the agents key node state by."""
    host: str | None = None
    """Node the port is bound to: spec.binding.host, or the node of the
    instance using the port (controller)."""
    dhcp_node: str | None = None
    """Node serving the network's DHCP, the only one whose agent may write
    `dhcp` (controller, from the network)."""
    binding: PortBindingStatus | None = None
    """Node-side binding, reported by the bound node's agent."""
    dhcp: PortDhcpStatus | None = None
    """DHCP host entry in place, reported by the DHCP node's agent."""
    port_security_enabled: bool | None = None
    """Port security in effect: the port's setting, or its network's
    (controller)."""
    security_groups: list[str] = Field(default_factory=list)
    """Security groups in effect: the port's list, the project's `default`
    when it names none, nothing when port security is off (controller)."""


class Port(Resource[PortSpec, PortStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="Port",
        selectable_fields=(".status.host", ".status.dhcpNode"),
        plural="ports",
        short_names=("nport",),
        categories=CATEGORIES,
        description="A Neutron port: MAC and fixed IPs on a network, plugged on a node.",
        printer_columns=(
            PrinterColumn("Network", ".spec.network.name"),
            PrinterColumn("MAC", ".status.macAddress"),
            PrinterColumn("IPs", ".status.fixedIps[*].ipAddress"),
            PrinterColumn("Node", ".status.host"),
            PrinterColumn("Owner", ".spec.deviceOwner", priority=1),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: PortSpec
    status: PortStatus = Field(default_factory=PortStatus)


# --- Router ------------------------------------------------------------------


class ExternalGateway(ApiModel):
    """The router's uplink to an external network."""

    network: ProjectRef
    """An external network."""
    enable_snat: bool = True
    """Source-NAT guest traffic to the gateway address."""
    fixed_ip: IP | None = None
    """Specific gateway address on the external network."""


class RouterInterface(ApiModel):
    """A subnet attached to the router; the router takes its gateway address."""

    subnet: str = Field(min_length=1, max_length=253)
    """Subnet name in the router's namespace."""


class Route(ApiModel):
    destination: CIDR
    """Destination CIDR."""
    nexthop: IP
    """Next hop, on one of the router's subnets."""


class RouterSpec(ApiModel):
    """A virtual router between a project's subnets and an external network."""

    external_gateway: ExternalGateway | None = None
    """Uplink with SNAT."""
    interfaces: list[RouterInterface] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["subnet"],
        },
    )
    """Attached subnets (each at most once)."""
    routes: list[Route] = Field(default_factory=list, max_length=64)
    """Extra static routes."""
    admin_state_up: bool = True
    """When false the router does not forward."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class RouterPortStatus(ApiModel):
    """A port the router holds (controller): the agent plugs it as is."""

    name: str
    """Port name."""
    namespace: str
    """Port namespace: the router's, or the external network's for the gateway."""
    subnet: str
    """Subnet of the port's address."""
    cidr: str
    """The subnet's CIDR."""
    ip_address: str
    """The router's address on that subnet."""
    gateway_ip: str | None = None
    """Upstream gateway (the external subnet's gateway; gateway port only)."""


class RouterL3Status(ApiModel):
    """Written by the agent of the router's node."""

    node: str
    """Node that reports."""
    ready: bool = False
    """True once namespace, ports, routes and NAT rules are in place."""
    error: str = ""
    """Why the router could not be set up on the node."""
    floating_ips: list[str] = Field(default_factory=list)
    """Floating addresses whose NAT rules are in place."""


class RouterStatus(Status):
    node: str | None = None
    """Node hosting the router namespace (an L3 node; moved when it dies)."""
    gateway_ip: str | None = None
    """Address on the external network."""
    external_network_uid: str | None = None
    """Uid of the external network of the gateway."""
    enable_snat: bool | None = None
    """SNAT in effect on the gateway."""
    gateway_port: RouterPortStatus | None = None
    """The gateway port on the external network (controller)."""
    interfaces: list[RouterPortStatus] = Field(default_factory=list)
    """Interface ports in effect, one per attached subnet (controller)."""
    routes: list[Route] = Field(default_factory=list)
    """Static routes in effect (controller)."""
    l3: RouterL3Status | None = None
    """State on the router's node, reported by its agent."""


class Router(Resource[RouterSpec, RouterStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="Router",
        selectable_fields=(".status.node",),
        plural="routers",
        short_names=("rt",),
        categories=CATEGORIES,
        description="A Neutron router: routes between subnets and SNATs to an external network.",
        printer_columns=(
            PrinterColumn("Gateway", ".status.gatewayIp"),
            PrinterColumn("Node", ".status.node"),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: RouterSpec = Field(default_factory=RouterSpec)
    status: RouterStatus = Field(default_factory=RouterStatus)


# --- FloatingIP --------------------------------------------------------------


class FloatingIPSpec(ApiModel):
    """A public address from an external network, NATed to a port."""

    floating_network: Annotated[ProjectRef, Immutable("floatingNetwork")]
    """The external network to take the address from."""
    floating_ip_address: Annotated[IP | None, Immutable("floatingIpAddress")] = None
    """A specific address; allocated when not given."""
    port: str | None = Field(default=None, max_length=253)
    """Port (same namespace) to associate; absent means unassociated."""
    fixed_ip_address: IP | None = None
    """Which of the port's addresses to map; defaults to its first IPv4."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class FloatingIPStatus(Status):
    floating_ip_address: str | None = None
    """Allocated address."""
    subnet: str | None = None
    """External subnet the address is from."""
    fixed_ip_address: str | None = None
    """Mapped port address."""
    port_uid: str | None = None
    """Uid of the associated port."""
    router: str | None = None
    """Router doing the NAT."""
    node: str | None = None
    """Node of that router."""


class FloatingIP(Resource[FloatingIPSpec, FloatingIPStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="FloatingIP",
        selectable_fields=(".status.node",),
        plural="floatingips",
        short_names=("fip",),
        categories=CATEGORIES,
        description="A floating IP: an external address mapped to a port by DNAT.",
        printer_columns=(
            PrinterColumn("Address", ".status.floatingIpAddress"),
            PrinterColumn("Port", ".spec.port"),
            PrinterColumn("Fixed", ".status.fixedIpAddress"),
            PrinterColumn("Router", ".status.router", priority=1),
            PrinterColumn("Node", ".status.node", priority=1),
            READY_COLUMN,
            REASON_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: FloatingIPSpec
    status: FloatingIPStatus = Field(default_factory=FloatingIPStatus)


# --- SecurityGroup -----------------------------------------------------------


class SecurityGroupRule(ApiModel):
    """Allow traffic matching this rule (security groups are allow-lists)."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.portRangeMin) || !has(self.portRangeMax)"
                " || self.portRangeMin <= self.portRangeMax",
                "portRangeMin must not exceed portRangeMax",
            ),
            cel(
                "!(has(self.portRangeMin) || has(self.portRangeMax))"
                " || self.protocol in ['tcp', 'udp', 'sctp']",
                "port ranges need protocol tcp, udp or sctp",
            ),
            cel(
                "!(has(self.remoteIpPrefix) && has(self.remoteGroup))",
                "remoteIpPrefix and remoteGroup are mutually exclusive",
            ),
            cel(
                "!(has(self.icmpType) || has(self.icmpCode))"
                " || self.protocol in ['icmp', 'icmpv6', '1', '58']",
                "icmpType and icmpCode need protocol icmp or icmpv6",
            ),
            cel(
                "!has(self.icmpCode) || has(self.icmpType)",
                "icmpCode needs icmpType",
            ),
            cel(
                "!has(self.remoteIpPrefix) || !isCIDR(self.remoteIpPrefix)"
                " || cidr(self.remoteIpPrefix).ip().family()"
                " == (self.ethertype == 'IPv4' ? 4 : 6)",
                "remoteIpPrefix must be of the rule's ethertype",
            ),
            cel(
                "!self.protocol.matches('^[0-9]+$') || int(self.protocol) <= 255",
                "a protocol number must be within 0..255",
            ),
        )
    )

    direction: Literal["ingress", "egress"] = "ingress"
    """Traffic direction, seen from the guest."""
    ethertype: Literal["IPv4", "IPv6"] = "IPv4"
    """IP family."""
    protocol: str = Field(
        default="any", pattern=r"^(any|tcp|udp|sctp|icmp|icmpv6|[0-9]{1,3})$", max_length=6
    )
    """Protocol: any, tcp, udp, sctp, icmp, icmpv6 or an IP protocol number
    (0..255). In an IPv6 rule icmp means ICMPv6, as in Neutron."""
    icmp_type: int | None = Field(default=None, ge=0, le=255)
    """ICMP type (icmp/icmpv6 only); absent means every type."""
    icmp_code: int | None = Field(default=None, ge=0, le=255)
    """ICMP code (needs icmpType); absent means every code."""
    port_range_min: int | None = Field(default=None, ge=1, le=65535)
    """First port (tcp/udp/sctp)."""
    port_range_max: int | None = Field(default=None, ge=1, le=65535)
    """Last port (tcp/udp/sctp)."""
    remote_ip_prefix: CIDR | None = None
    """Peer addresses."""
    remote_group: str | None = Field(default=None, max_length=253)
    """Peer security group (same namespace)."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class SecurityGroupSpec(ApiModel):
    """A named set of allow rules applied to ports."""

    rules: list[SecurityGroupRule] = Field(default_factory=list, max_length=256)
    """Allow rules; everything else is dropped (egress is open by default only
    through the rules the default group carries)."""
    description: str = Field(default="", max_length=255)
    """Free text."""


class SecurityGroupStatus(Status):
    ports: int | None = None
    """Number of ports using the group."""
    members: list[str] = Field(default_factory=list)
    """Addresses of the ports using the group (controller): what rules of
    other groups naming this one as remoteGroup match."""


class SecurityGroup(Resource[SecurityGroupSpec, SecurityGroupStatus]):
    crd = CrdInfo(
        group=GROUP,
        kind="SecurityGroup",
        plural="securitygroups",
        short_names=("sg", "secgroup"),
        categories=CATEGORIES,
        description="A security group: stateful allow rules enforced per port.",
        printer_columns=(
            PrinterColumn("Rules", ".spec.rules[*].protocol", priority=1),
            READY_COLUMN,
            AGE_COLUMN,
        ),
    )
    spec: SecurityGroupSpec = Field(default_factory=SecurityGroupSpec)
    status: SecurityGroupStatus = Field(default_factory=SecurityGroupStatus)


# --- Allocation (internal ledger) ----------------------------------------------


class AllocationOwner(ApiModel):
    kind: str = Field(max_length=63)
    """Kind of the holder."""
    namespace: str | None = Field(default=None, max_length=63)
    """Namespace of the holder."""
    name: str = Field(max_length=253)
    """Name of the holder."""
    uid: str = Field(max_length=128)
    """Uid of the holder: a re-created object with the same name is another holder."""


class AllocationSpec(ApiModel):
    """One allocated value. The object name encodes pool and value, so the API
    server's name uniqueness makes allocation atomic across controller workers."""

    pool: str = Field(max_length=253)
    """e.g. `ip/<subnet uid>`, `mac/<network uid>`, `segment/vxlan`."""
    value: str = Field(max_length=253)
    """The allocated value (address, MAC, segmentation id)."""
    owner: AllocationOwner
    """The object holding the value."""


class Allocation(Resource[AllocationSpec, Status]):
    crd = CrdInfo(
        group=GROUP,
        kind="Allocation",
        plural="allocations",
        short_names=("alloc",),
        # Internal ledger: kept out of `kubectl get nubes`, which would
        # otherwise list one row per address in use.
        categories=("nubes-internal",),
        scope="Cluster",
        description="Internal IPAM ledger: one object per allocated IP, MAC or segment id.",
        printer_columns=(
            PrinterColumn("Pool", ".spec.pool"),
            PrinterColumn("Value", ".spec.value"),
            PrinterColumn("Owner", ".spec.owner.name"),
            PrinterColumn("Namespace", ".spec.owner.namespace"),
            AGE_COLUMN,
        ),
    )
    spec: AllocationSpec
    status: Status = Field(default_factory=Status)
