"""
Tests for L{arvproxy.nodepolicy} and L{arvproxy.nodeconfig}: which queued containers a node
dispatcher takes, leaves or refuses, whether it has room, and its settings, table by table.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from twisted.trial import unittest

from arvproxy.config import ConfigError, parse_config
from arvproxy.nodeconfig import (
    CANCEL,
    GatewayAddress,
    NodeConfigError,
    NodeDispatcherConfig,
    dispatcher_token,
    parse_byte_size,
    parse_gateway_address,
)
from arvproxy.nodepolicy import (
    SKIP,
    TAKE,
    UNSUITABLE,
    Capacity,
    QueueEntry,
    Resources,
    free_port,
    judge,
)

GiB = 1 << 30
PORTS = {"8888": {"access": "private"}}
TMP = {"/out": {"kind": "tmp"}}


def entry(**fields: Any) -> QueueEntry:
    record = {
        "uuid": "zzzzz-dz642-000000000000001",
        "state": "Queued",
        "priority": 1,
        "published_ports": PORTS,
        "mounts": TMP,
        "runtime_constraints": {"ram": GiB, "vcpus": 1},
        **fields,
    }
    return QueueEntry.from_record(record)


NODE = NodeDispatcherConfig()
ROOMY = Capacity(Resources(ram=16 * GiB, vcpus=8))


class JudgeTests(unittest.TestCase):
    """What a node does with each queued container."""

    def test_table(self) -> None:
        """Each container is taken, left or found unsuitable for the reason the table says."""
        wanted = NodeDispatcherConfig(properties={"arvproxy": "yes"})
        cancel = NodeDispatcherConfig(unsuitable=CANCEL)
        cases: list[tuple[str, QueueEntry, NodeDispatcherConfig, Any, str, str]] = [
            ("plain service", entry(), NODE, None, TAKE, ""),
            ("no ports", entry(published_ports={}), NODE, None, SKIP, "publishes no ports"),
            (
                "ports on its request only (a retry)",
                entry(published_ports={}),
                NODE,
                [{"state": "Committed", "published_ports": PORTS}],
                TAKE,
                "",
            ),
            (
                "ports on a finished request only",
                entry(published_ports={}),
                NODE,
                [{"state": "Final", "published_ports": PORTS}],
                SKIP,
                "publishes no ports",
            ),
            (
                "no ports, ports not asked for",
                entry(published_ports={}),
                NodeDispatcherConfig(published_ports_only=False),
                None,
                TAKE,
                "",
            ),
            (
                "property present",
                entry(),
                wanted,
                [{"state": "Committed", "properties": {"arvproxy": "yes"}}],
                TAKE,
                "",
            ),
            (
                "property with another value",
                entry(),
                wanted,
                [{"state": "Committed", "properties": {"arvproxy": "no"}}],
                SKIP,
                "arvproxy='yes'",
            ),
            (
                "property only on a finished request",
                entry(),
                wanted,
                [{"state": "Final", "properties": {"arvproxy": "yes"}}],
                SKIP,
                "no committed request",
            ),
            ("property, requests not read", entry(), wanted, None, SKIP, "no committed request"),
            (
                "a Keep collection",
                entry(mounts={**TMP, "/in": {"kind": "collection", "portable_data_hash": "x"}}),
                NODE,
                None,
                UNSUITABLE,
                "mounts of kind collection (/in)",
            ),
            (
                "a mount that is not a mapping",
                entry(mounts={"/in": "collection"}),
                NODE,
                None,
                UNSUITABLE,
                "(/in)",
            ),
            ("no mounts at all", entry(mounts={}), NODE, None, TAKE, ""),
            (
                "too much RAM for the node",
                entry(runtime_constraints={"ram": 8 * GiB, "keep_cache_ram": 9 * GiB}),
                NODE,
                None,
                UNSUITABLE,
                "RAM",
            ),
            (
                "too many cores",
                entry(runtime_constraints={"vcpus": 9}),
                NODE,
                None,
                UNSUITABLE,
                "9 cores",
            ),
            (
                "unsuitable, to be cancelled",
                entry(runtime_constraints={"vcpus": 9}),
                cancel,
                None,
                UNSUITABLE,
                "9 cores",
            ),
            (
                "not ours is never cancelled",
                entry(published_ports={}, runtime_constraints={"vcpus": 9}),
                cancel,
                None,
                SKIP,
                "publishes no ports",
            ),
        ]
        for name, queued, node, requests, action, reason in cases:
            verdict = judge(queued, node, ROOMY, requests)
            self.assertEqual(verdict.action, action, name)
            self.assertIn(reason, verdict.reason, name)
            self.assertEqual(
                verdict.cancel, action == UNSUITABLE and node.unsuitable == CANCEL, name
            )

    def test_malformed_records(self) -> None:
        """A list item that is not a container record is refused, not half-read."""
        for record in (
            {"state": "Queued"},
            {"uuid": "x", "state": "Queued", "priority": "high"},
            {"uuid": "x", "state": "Queued", "mounts": ["/out"]},
        ):
            self.assertRaises(ValueError, QueueEntry.from_record, record)

    def test_needs(self) -> None:
        """RAM is ram + keep_cache_ram and cores are vcpus; odd values count as nothing."""
        cases = [
            ({"ram": 100, "keep_cache_ram": 20, "vcpus": 2}, Resources(120, 2)),
            ({}, Resources(0, 0)),
            ({"ram": -5, "vcpus": True}, Resources(0, 0)),
            ({"ram": "lots", "vcpus": 1.0}, Resources(0, 1)),
        ]
        for constraints, needs in cases:
            self.assertEqual(Resources.of(constraints), needs, constraints)


class CapacityTests(unittest.TestCase):
    """Room for one more container, by RAM, cores and count."""

    def test_table(self) -> None:
        """A container fits only while every limit holds with it added."""
        one = Resources(GiB, 1)
        cases = [
            (Capacity(Resources(4 * GiB, 4)), [], one, True),
            (Capacity(Resources(4 * GiB, 4)), [one, one, one], one, True),
            (Capacity(Resources(4 * GiB, 4)), [one, one, one, one], one, False),
            (
                Capacity(Resources(4 * GiB, 8)),
                [Resources(3 * GiB, 1)],
                Resources(2 * GiB, 1),
                False,
            ),
            (Capacity(Resources(64 * GiB, 2)), [one], Resources(GiB, 2), False),
            (Capacity(Resources(64 * GiB, 64), max_containers=2), [one, one], one, False),
            (Capacity(Resources(64 * GiB, 64), max_containers=2), [one], one, True),
            (Capacity(Resources(64 * GiB, 64)), [Resources()] * 50, Resources(), True),
        ]
        for capacity, running, needs, fits in cases:
            self.assertEqual(capacity.fits(running, needs), fits, (capacity, running, needs))

    def test_from_settings(self) -> None:
        """Zero settings mean the machine's own memory and cores."""
        self.assertEqual(
            Capacity.from_settings(NodeDispatcherConfig(), 8 * GiB, 4),
            Capacity(Resources(8 * GiB, 4), 0),
        )
        self.assertEqual(
            Capacity.from_settings(
                NodeDispatcherConfig(max_ram=GiB, max_vcpus=2, max_containers=3), 8 * GiB, 4
            ),
            Capacity(Resources(GiB, 2), 3),
        )

    def test_free_port(self) -> None:
        """Ports come from the range, round from the last one given, never one in use."""
        cases = [
            ((5000, 5002), [], None, 5000),
            ((5000, 5002), [5000], None, 5001),
            ((5000, 5002), [], 5000, 5001),
            ((5000, 5002), [], 5002, 5000),
            ((5000, 5002), [5000, 5001, 5002], None, None),
            ((5000, 5002), [5001], 5000, 5002),
            ((5000, 5000), [], 4000, 5000),
        ]
        for ports, taken, after, expected in cases:
            self.assertEqual(free_port(ports, taken, after), expected, (ports, taken, after))


class NodeSettingsTests(unittest.TestCase):
    """C{ArvProxy.NodeDispatcher}: values, and mistakes named by their full key."""

    def config(self, node: Any, **cluster: Any) -> Any:
        document = {
            "Clusters": {
                "zzzzz": {
                    "SystemRootToken": "x" * 40,
                    "Services": {
                        "ContainerWebServices": {"ExternalURL": "https://*.containers.example"},
                        "Controller": {"ExternalURL": "https://zzzzz.example"},
                    },
                    "ArvProxy": {"Backend": "arvados", "NodeDispatcher": node},
                    **cluster,
                }
            }
        }
        return parse_config(yaml.safe_load(yaml.safe_dump(document)), "/etc/arvados/config.yml")

    def test_values(self) -> None:
        """Every key is read into the settings, with paths relative to the file."""
        node = self.config(
            {
                "TokenFile": "node-token",
                "GatewayAddress": "10.0.0.5:41000-41099",
                "Take": {"PublishedPorts": False, "Properties": {"arvproxy": True}},
                "MaxContainers": 4,
                "MaxRAM": "16GiB",
                "MaxVCPUs": 8,
                "MountKinds": ["tmp", "text"],
                "Unsuitable": "Cancel",
                "PollInterval": "500ms",
            }
        ).node_dispatcher
        self.assertEqual(node.token_file, "/etc/arvados/node-token")
        self.assertEqual(node.gateway_address, GatewayAddress("10.0.0.5", (41000, 41099)))
        self.assertFalse(node.published_ports_only)
        self.assertEqual(node.properties, {"arvproxy": True})
        self.assertEqual((node.max_containers, node.max_ram, node.max_vcpus), (4, 16 * GiB, 8))
        self.assertEqual(node.mount_kinds, ("tmp", "text"))
        self.assertEqual((node.unsuitable, node.poll_interval), ("Cancel", 0.5))
        self.assertIsNone(self.config(None).node_dispatcher)

    def test_mistakes(self) -> None:
        """Each mistake stops start-up with one message naming the key."""
        at = "Clusters.zzzzz.ArvProxy.NodeDispatcher"
        cases = [
            ({"Tokn": "x"}, f"{at}.Tokn: unknown key"),
            ({"Token": "a", "TokenFile": "b"}, f"{at}.TokenFile"),
            ({"Token": "a", "UseSystemRootToken": True}, f"{at}.UseSystemRootToken"),
            ({"UseSystemRootToken": "yes"}, f"{at}.UseSystemRootToken"),
            ({"GatewayAddress": "0.0.0.0:0"}, f"{at}.GatewayAddress"),
            ({"GatewayAddress": "10.0.0.5:8000"}, f"{at}.GatewayAddress"),
            ({"GatewayAddress": "10.0.0.5:9000-8000"}, f"{at}.GatewayAddress"),
            ({"GatewayAddress": "http://10.0.0.5:0"}, f"{at}.GatewayAddress"),
            ({"Take": {"Ports": True}}, f"{at}.Take.Ports"),
            ({"Take": {"Properties": ["a"]}}, f"{at}.Take.Properties"),
            ({"MaxContainers": -1}, f"{at}.MaxContainers"),
            ({"MaxVCPUs": "many"}, f"{at}.MaxVCPUs"),
            ({"MaxRAM": "16 apples"}, f"{at}.MaxRAM"),
            ({"MountKinds": ["tmp", "nfs"]}, f"{at}.MountKinds"),
            ({"Unsuitable": "cancel"}, f"{at}.Unsuitable"),
            ({"PollInterval": "soon"}, f"{at}.PollInterval"),
            ("yes", f"{at}: expected a mapping"),
        ]
        for node, key in cases:
            with self.assertRaises(ConfigError, msg=node) as caught:
                self.config(node)
            self.assertIn(key, str(caught.exception), node)
            self.assertNotIn("x" * 40, str(caught.exception))

    def test_addresses(self) -> None:
        """Gateway addresses: a host and port 0, or a range; IPv6 in brackets."""
        self.assertEqual(parse_gateway_address("node1.example:0"), GatewayAddress("node1.example"))
        self.assertEqual(
            parse_gateway_address("[fd00::5]:7000-7001"), GatewayAddress("fd00::5", (7000, 7001))
        )
        self.assertEqual(GatewayAddress("fd00::5").with_port(7000), "[fd00::5]:7000")
        for bad in ("[::]:0", "node1", "node1:", ":0", "node 1:0", "node1:0-0", 5):
            self.assertRaises(ValueError, parse_gateway_address, bad)

    def test_byte_sizes(self) -> None:
        """Byte sizes as Arvados writes them (sdk/go/arvados/byte_size.go)."""
        cases = [(0, 0), (1024, 1024), ("1KiB", 1024), ("2K", 2000), ("1.5GiB", 3 * GiB // 2)]
        cases += [("16GB", 16 * 10**9), ("3MiB", 3 << 20), ("7", 7)]
        for value, expected in cases:
            self.assertEqual(parse_byte_size(value), expected, value)
        for bad in (-1, "lots", True, "1XiB", None):
            self.assertRaises(ValueError, parse_byte_size, bad)

    def test_token(self) -> None:
        """The token comes from Token, TokenFile or the SystemRootToken, else a clear error."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("v2/zzzzz-gj3su-000000000000001/secret\n")
        self.assertEqual(
            dispatcher_token(self.config({"TokenFile": path})),
            "v2/zzzzz-gj3su-000000000000001/secret",
        )
        self.assertEqual(dispatcher_token(self.config({"Token": "abc"})), "abc")
        self.assertEqual(dispatcher_token(self.config({"UseSystemRootToken": True})), "x" * 40)
        for node, message in (
            (None, "NodeDispatcher: missing"),
            ({}, "TokenFile: missing"),
            ({"TokenFile": path + ".gone"}, "cannot read"),
        ):
            with self.assertRaises(NodeConfigError) as caught:
                dispatcher_token(self.config(node))
            self.assertIn(message, str(caught.exception))
        with open(path, "w") as f:
            f.write("two tokens\n")
        self.assertRaises(NodeConfigError, dispatcher_token, self.config({"TokenFile": path}))
