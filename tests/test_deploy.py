"""
Tests for the deployment files: the systemd units in C{conf/systemd/} parse (and pass
C{systemd-analyze verify}), and the configuration in C{docs/deploy-arvados.md} loads with the
project's own parser.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import yaml
from twisted.trial import unittest

from arvproxy import nodedispatcher
from arvproxy.config import parse_config
from arvproxy.controller import tap as controller_tap
from arvproxy.nodeconfig import GatewayAddress
from tests.e2e import REPO_ROOT

UNITS = os.path.join(REPO_ROOT, "conf", "systemd")
GUIDE = os.path.join(REPO_ROOT, "docs", "deploy-arvados.md")
TWISTD_IN_UNITS = "/opt/arvproxy/bin/twistd"


def read_unit(path: str) -> dict[str, dict[str, str]]:
    """A unit file's sections and keys (systemd's syntax: comments, no repeated keys here)."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text[0] in "#;":
                continue
            match = re.fullmatch(r"\[([A-Za-z]+)\]", text)
            if match:
                current = sections.setdefault(match.group(1), {})
                continue
            key, equals, value = text.partition("=")
            if current is None or not equals or not re.fullmatch(r"[A-Za-z]+", key):
                raise AssertionError(f"{path}:{number}: not a unit line: {text!r}")
            if key in current:
                raise AssertionError(f"{path}:{number}: {key} given twice")
            current[key] = value
    return sections


class UnitTests(unittest.TestCase):
    """The systemd units for the front door and the node dispatcher."""

    def test_units_parse(self) -> None:
        """Each unit runs its plugin with options the plugin knows, and restarts it."""
        plugins = {
            "arv-controller-proxy.service": ("arv-controller-proxy", controller_tap.Options),
            "arv-node-dispatcher.service": ("arv-node-dispatcher", nodedispatcher.Options),
        }
        self.assertEqual(sorted(os.listdir(UNITS)), sorted(plugins))
        for name, (plugin, options) in plugins.items():
            unit = read_unit(os.path.join(UNITS, name))
            self.assertEqual(sorted(unit), ["Install", "Service", "Unit"], name)
            service = unit["Service"]
            self.assertEqual((service["Type"], service["Restart"]), ("simple", "always"), name)
            argv = shlex.split(service["ExecStart"])
            self.assertEqual(argv[:4], [TWISTD_IN_UNITS, "--nodaemon", "--pidfile=", plugin])
            known = {f"--{o[0]}" for o in options.optParameters + getattr(options, "optFlags", [])}
            given = [a for a in argv[4:] if a.startswith("--")]
            self.assertTrue(set(given) <= known, (name, given))
            self.assertEqual(argv[argv.index("--config") + 1], "/etc/arvados/config.yml")
            self.assertEqual(unit["Install"]["WantedBy"], "multi-user.target")
        node = read_unit(os.path.join(UNITS, "arv-node-dispatcher.service"))["Service"]
        self.assertEqual(node["KillMode"], "mixed")
        self.assertIn("--hand-back", node["ExecStart"])

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify accepts both units (with this checkout's twistd)."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            if os.environ.get("CI", "").lower() == "true":
                raise unittest.FailTest("CI=true and systemd-analyze is missing")
            raise unittest.SkipTest("systemd-analyze is missing (Debian: systemd)")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        paths = []
        for name in os.listdir(UNITS):
            with open(os.path.join(UNITS, name)) as f:
                text = f.read().replace(TWISTD_IN_UNITS, twistd)
            paths.append(os.path.join(directory, name))
            with open(paths[-1], "w") as f:
                f.write(text)
        result = subprocess.run(
            [analyze, "verify", *paths], capture_output=True, text=True, cwd=directory, timeout=60
        )
        self.assertEqual((result.returncode, result.stderr, result.stdout), (0, "", ""))


class GuideTests(unittest.TestCase):
    """docs/deploy-arvados.md."""

    def test_config_example_loads(self) -> None:
        """The guide's config.yml loads with the project's parser, node settings and all."""
        with open(GUIDE) as f:
            blocks = re.findall(r"```yaml\n(.*?)```", f.read(), re.S)
        self.assertEqual(len(blocks), 1)
        config = parse_config(yaml.safe_load(blocks[0]), "/etc/arvados/config.yml")
        self.assertEqual(
            (config.backend, config.api_url), ("arvados", "https://zzzzz.example.com/")
        )
        node = config.node_dispatcher
        assert node is not None
        self.assertEqual(node.token_file, "/etc/arvados/arvproxy-node-token")
        self.assertEqual(
            node.gateway_address, GatewayAddress("compute0.zzzzz.example.com", (7000, 7099))
        )
        self.assertEqual(config.container_logs, "/var/lib/arvproxy/container-logs")

    def test_guide_is_linked(self) -> None:
        """The README links the guide."""
        with open(os.path.join(REPO_ROOT, "README.md")) as f:
            self.assertTrue("(docs/deploy-arvados.md)" in f.read())
