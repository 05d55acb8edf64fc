"""
C{ArvProxy.NodeDispatcher}: the settings of C{twistd arv-node-dispatcher}, the dispatcher that runs
one compute node's share of an Arvados cluster's container queue (L{arvproxy.nodedispatcher}).

Parsed with the rest of the configuration (L{arvproxy.config.parse_config} calls
L{parse_node_dispatcher}), so a mistake is reported at start-up by its full key name, whichever
program reads the file.  Every key is optional here; what only the node dispatcher needs (its
token, its address) is required when it starts (L{require_node_settings})::

    ArvProxy:
      NodeDispatcher:
        TokenFile: /etc/arvados/arvproxy-node-token   # or Token: "v2/...", one of the two
        UseSystemRootToken: false         # true: the SystemRootToken makes the API calls
        GatewayAddress: "10.0.0.5:0"      # or "10.0.0.5:41000-41099"; how the front door
                                          # reaches this node
        Take:
          PublishedPorts: true            # only containers that publish ports
          Properties: {}                  # and whose request carries these properties
        MaxContainers: 0                  # 0: no limit
        MaxRAM: 0                         # bytes, or "16GiB"; 0: this machine's memory
        MaxVCPUs: 0                       # 0: this machine's cores
        MountKinds: [tmp]                 # mount kinds this node provides
        Unsuitable: Leave                 # or Cancel (with a runtime_status reason)
        PollInterval: 2s
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arvproxy.config import ClusterConfig

NODE_KEYS = (
    "Token",
    "TokenFile",
    "UseSystemRootToken",
    "GatewayAddress",
    "Take",
    "MaxContainers",
    "MaxRAM",
    "MaxVCPUs",
    "MountKinds",
    "Unsuitable",
    "PollInterval",
)
TAKE_KEYS = ("PublishedPorts", "Properties")
MOUNT_KINDS = ("collection", "tmp", "keep", "file", "json", "text", "git_tree")
"""The mount kinds of C{ContainerRequest::MountKindFields} (C{container_request.rb})."""
LEAVE = "Leave"
CANCEL = "Cancel"

# sdk/go/arvados/byte_size.go: prefixValue
_BYTE_PREFIXES = {
    "": 1,
    "K": 1000,
    "Ki": 1 << 10,
    "M": 1000**2,
    "Mi": 1 << 20,
    "G": 1000**3,
    "Gi": 1 << 30,
    "T": 1000**4,
    "Ti": 1 << 40,
    "P": 1000**5,
    "Pi": 1 << 50,
}
_BYTE_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([KMGTP]i?)?B?\s*")


@dataclass(frozen=True)
class GatewayAddress:
    """
    Where this node's gateways listen, as the front door reaches them.

    @ivar host: a name or address of this node (never a wildcard such as C{0.0.0.0}).
    @ivar ports: the first and last port of the range gateways take ports from, or C{None}
        for any free port (C{host:0}).
    """

    host: str
    ports: tuple[int, int] | None = None

    def with_port(self, port: int) -> str:
        """C{host:port} as a gateway's C{GatewayAddress} (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"


@dataclass(frozen=True)
class NodeDispatcherConfig:
    """
    C{ArvProxy.NodeDispatcher} (see this module's docstring).

    @ivar token: the dispatcher's own API token (from C{Token}; C{""} when not given there).
    @ivar token_file: C{TokenFile}, an absolute path, or C{""}.
    @ivar gateway_address: C{None} when not configured (C{--gateway-address} must say).
    @ivar properties: container request properties a container's request must carry.
    @ivar max_ram: bytes; 0 means this machine's memory.
    @ivar max_vcpus: 0 means this machine's cores.
    @ivar max_containers: 0 means no limit.
    """

    token: str = field(default="", repr=False)
    token_file: str = ""
    use_system_root_token: bool = False
    gateway_address: GatewayAddress | None = None
    published_ports_only: bool = True
    properties: Mapping[str, Any] = field(default_factory=dict)
    max_containers: int = 0
    max_ram: int = 0
    max_vcpus: int = 0
    mount_kinds: tuple[str, ...] = ("tmp",)
    unsuitable: str = LEAVE
    poll_interval: float = 2.0


class NodeConfigError(Exception):
    """The node dispatcher cannot start with these settings; the message names the key."""


def parse_byte_size(value: object) -> int:
    """
    An Arvados C{ByteSize}: a whole number of bytes, or a string like C{"16GiB"}, C{"512M"}
    (C{K}, C{M}... are powers of 1000, C{Ki}, C{Mi}... of 1024; C{B} optional).

    @raise ValueError: neither.
    """
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(value)
        return value
    if not isinstance(value, str):
        raise ValueError(value)
    match = _BYTE_SIZE.fullmatch(value)
    if match is None:
        raise ValueError(value)
    number, prefix = match.groups()
    return int(float(number) * _BYTE_PREFIXES[prefix or ""])


def parse_gateway_address(text: object) -> GatewayAddress:
    """
    C{host:0} (any free port) or C{host:FIRST-LAST} (a port from that range); the host a name
    or an address of this node (IPv6 in brackets), never a wildcard.

    @raise ValueError: anything else, saying what was expected.
    """
    expected = 'expected "host:0" or "host:FIRST-LAST", like "10.0.0.5:41000-41099"'
    if not isinstance(text, str):
        raise ValueError(expected)
    match = re.fullmatch(
        r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})(?:-([0-9]{1,5}))?", text
    )
    if match is None:
        raise ValueError(f"{expected}, got {text[:100]!r}")
    host, first, last = match.group(1).strip("[]"), int(match.group(2)), match.group(3)
    if host in ("0.0.0.0", "::", "0:0:0:0:0:0:0:0"):
        raise ValueError(
            f"{host} is every address, not one the front door can dial: name this node's "
            "address as the front door reaches it"
        )
    if last is None:
        if first != 0:
            raise ValueError(f"{expected}: a single port fits one gateway only, got {text!r}")
        return GatewayAddress(host)
    if not 1 <= first <= int(last) <= 65535:
        raise ValueError(f"{expected}: the range must go up, within 1-65535, got {text!r}")
    return GatewayAddress(host, (first, int(last)))


def parse_node_dispatcher(p: Any, value: object, at: str) -> NodeDispatcherConfig | None:
    """
    C{ArvProxy.NodeDispatcher} at key C{at}, with the configuration parser C{p} (its C{fail},
    C{mapping}, C{known_keys} and C{duration}); C{None} when the section is absent.
    """
    if value is None:
        return None
    own = p.mapping(value, at)
    p.known_keys(own, at, NODE_KEYS)
    token = own.get("Token", "")
    if not isinstance(token, str) or (token and not token.isprintable()):
        p.fail(f"{at}.Token", "expected the dispatcher's API token (a string)")
    token_file = own.get("TokenFile", "")
    if not isinstance(token_file, str):
        p.fail(f"{at}.TokenFile", "expected the path of a file holding the dispatcher's token")
    if token and token_file:
        p.fail(f"{at}.TokenFile", f"give the token once: {at}.Token or {at}.TokenFile, not both")
    if token_file:
        base = os.path.dirname(os.path.abspath(p.source))
        token_file = os.path.normpath(os.path.join(base, token_file))
    use_root = own.get("UseSystemRootToken", False)
    if not isinstance(use_root, bool):
        p.fail(f"{at}.UseSystemRootToken", "expected true or false")
    if use_root and (token or token_file):
        p.fail(
            f"{at}.UseSystemRootToken",
            f"true, but {at}.Token or {at}.TokenFile names a token too: keep one",
        )
    address = None
    if own.get("GatewayAddress") is not None:
        try:
            address = parse_gateway_address(own["GatewayAddress"])
        except ValueError as e:
            p.fail(f"{at}.GatewayAddress", str(e))
    take = p.mapping(own.get("Take"), f"{at}.Take", optional=True)
    p.known_keys(take, f"{at}.Take", TAKE_KEYS)
    published = take.get("PublishedPorts", True)
    if not isinstance(published, bool):
        p.fail(f"{at}.Take.PublishedPorts", "expected true or false")
    properties = p.mapping(take.get("Properties"), f"{at}.Take.Properties", optional=True)
    if not all(isinstance(k, str) for k in properties):
        p.fail(f"{at}.Take.Properties", "expected property names (strings) as keys")
    counts = {}
    for name in ("MaxContainers", "MaxVCPUs"):
        number = own.get(name, 0)
        if isinstance(number, bool) or not isinstance(number, int) or number < 0:
            p.fail(f"{at}.{name}", "expected a whole number (0: no limit of its own)")
        counts[name] = number
    try:
        ram = parse_byte_size(own.get("MaxRAM", 0))
    except ValueError:
        p.fail(f"{at}.MaxRAM", 'expected bytes, like 17179869184 or "16GiB" (0: all of it)')
    kinds = own.get("MountKinds", ["tmp"])
    if not isinstance(kinds, list) or not all(k in MOUNT_KINDS for k in kinds):
        p.fail(f"{at}.MountKinds", f"expected a list of mount kinds among {', '.join(MOUNT_KINDS)}")
    unsuitable = own.get("Unsuitable", LEAVE)
    if unsuitable not in (LEAVE, CANCEL):
        p.fail(f"{at}.Unsuitable", f'expected "{LEAVE}" or "{CANCEL}"')
    poll = p.duration(own.get("PollInterval", 2), f"{at}.PollInterval")
    return NodeDispatcherConfig(
        token=token,
        token_file=token_file,
        use_system_root_token=use_root,
        gateway_address=address,
        published_ports_only=published,
        properties=dict(properties),  # type: ignore[arg-type]
        max_containers=counts["MaxContainers"],
        max_ram=ram,
        max_vcpus=counts["MaxVCPUs"],
        mount_kinds=tuple(kinds),
        unsuitable=unsuitable,
        poll_interval=poll,
    )


def dispatcher_token(config: ClusterConfig) -> str:
    """
    The token the node dispatcher makes its API calls with: C{Token}, the contents of
    C{TokenFile}, or the SystemRootToken with C{UseSystemRootToken: true}.

    @raise NodeConfigError: none is configured, or the file cannot be read or is empty.
    """
    at = f"{config.source}: Clusters.{config.cluster_id}.ArvProxy.NodeDispatcher"
    node = config.node_dispatcher
    if node is None:
        raise NodeConfigError(
            f"{at}: missing: a node dispatcher needs this section (its token and GatewayAddress)"
        )
    if node.use_system_root_token:
        return config.system_root_token
    if node.token:
        return node.token
    if not node.token_file:
        raise NodeConfigError(
            f"{at}.TokenFile: missing: the dispatcher's own API token (an admin's), in a file "
            "(or Token, or UseSystemRootToken: true)"
        )
    try:
        return read_token_file(node.token_file)
    except ValueError as e:
        raise NodeConfigError(f"{at}.TokenFile: {e}") from None


def read_token_file(path: str) -> str:
    """
    The one token a file holds (blank lines and surrounding space ignored).

    @raise ValueError: it cannot be read, or does not hold exactly one token.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not token or not token.isprintable() or len(token.split()) != 1:
        raise ValueError(f"{path} does not hold one token")
    return token
