"""
Tests for L{arvproxy.config}: every way a configuration file can be wrong gets one clear message,
and every right one parses into the values the services use.
"""

from __future__ import annotations

import builtins
import copy
import ipaddress
import os
from typing import Any

import yaml
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from arvproxy.config import (
    ClusterConfig,
    ConfigError,
    ExternalURL,
    listen_endpoint,
    load_config,
    parse_config,
    parse_duration,
)

CONF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "conf")
TOKEN = "SeKrEt0TokenValue0ThatMustNeverBeShown0123456789"
CWS = "Clusters.zzzzz.Services.ContainerWebServices"
AP = "Clusters.zzzzz.ArvProxy"
_MISSING = object()


def minimal() -> dict[str, Any]:
    """A fresh, valid document with everything arvproxy needs and nothing else."""
    return {
        "Clusters": {
            "zzzzz": {
                "SystemRootToken": TOKEN,
                "Services": {
                    "ContainerWebServices": {"ExternalURL": "https://*.containers.example.com"}
                },
            }
        }
    }


def with_value(path: str, value: object) -> dict[str, Any]:
    """L{minimal} with the key at dotted C{path} set to C{value} (or removed for C{_MISSING})."""
    document = minimal()
    *parents, last = path.split(".")
    node: Any = document
    for name in parents:
        node = node.setdefault(name, {})
    if value is _MISSING:
        del node[last]
    else:
        node[last] = copy.deepcopy(value)
    return document


TOK = "Clusters.zzzzz.SystemRootToken"
EXT = f"{CWS}.ExternalURL"
INT = f"{CWS}.InternalURLs"


def tok(value: object) -> dict[str, Any]:
    """L{minimal} with this SystemRootToken."""
    return with_value(TOK, value)


def ext(value: object) -> dict[str, Any]:
    """L{minimal} with this ExternalURL."""
    return with_value(EXT, value)


def internal(value: object) -> dict[str, Any]:
    """L{minimal} with these InternalURLs."""
    return with_value(INT, value)


def renamed(path: str, new_name: str) -> dict[str, Any]:
    """L{minimal} with the key at dotted C{path} renamed to C{new_name}."""
    document = minimal()
    *parents, last = path.split(".")
    node: Any = document
    for name in parents:
        node = node[name]
    node[new_name] = node.pop(last)
    return document


# (full key named in the message, a fragment of what it says, the document)
ERRORS: list[tuple[str, str, object]] = [
    ("", "expected a mapping", ["Clusters"]),
    ("", "expected a mapping", "just a string"),
    ("Clusters", "missing", {"Other": 1}),
    ("Clusters", "case-sensitive", {"clusters": minimal()["Clusters"]}),
    ("Clusters", "expected a mapping, got a list", {"Clusters": ["zzzzz"]}),
    ("Clusters", "got none", {"Clusters": {}}),
    ("Clusters.ZZZZZ", "exactly 5 characters", {"Clusters": {"ZZZZZ": {}}}),
    ("Clusters.zzzz", "exactly 5 characters", {"Clusters": {"zzzz": {}}}),
    ("Clusters.zz-zz", "exactly 5 characters", {"Clusters": {"zz-zz": {}}}),
    ("Clusters.12345", "quote it", {"Clusters": {12345: {}}}),
    ("Clusters.zzzzz", "expected a mapping, got a list", {"Clusters": {"zzzzz": []}}),
    (TOK, "missing", tok(_MISSING)),
    (TOK, "missing", tok(None)),
    (TOK, "empty string", tok("")),
    (TOK, "at least 32 characters, got 6 characters", tok("s3cr3t")),
    (TOK, "got 31 characters", tok(TOKEN[:31])),
    (TOK, "got a number", tok(1234567890123456789012345678901234567890)),
    (TOK, "got a list", tok([TOKEN])),
    (TOK, "other characters", tok(TOKEN + " x")),
    (TOK, "other characters", tok(TOKEN + "\n")),
    ("Clusters.zzzzz.Services", "missing", with_value("Clusters.zzzzz.Services", _MISSING)),
    (
        "Clusters.zzzzz.Services",
        "expected a mapping, got a list",
        with_value("Clusters.zzzzz.Services", []),
    ),
    (CWS, "missing", with_value(CWS, _MISSING)),
    (
        CWS,
        'expected a mapping, got "https://*.x.example.com"',
        with_value(CWS, "https://*.x.example.com"),
    ),
    (EXT, "missing", ext(_MISSING)),
    (EXT, "case-sensitive", renamed(EXT, "ExternalUrl")),
    (EXT, 'got ""', ext("")),
    (EXT, "got a list", ext(["https://*.a.example.com"])),
    (
        EXT,
        'expected a wildcard URL like "https://*.containers.example.com", got "https://containers.example.com"',
        ext("https://containers.example.com"),
    ),
    (EXT, "expected a wildcard URL", ext("https://x.*.example.com")),
    (EXT, "expected a wildcard URL", ext("*.containers.example.com")),
    (EXT, "expected a wildcard URL", ext("https://*containers.example.com")),
    (EXT, "scheme http or https", ext("ftp://*.containers.example.com")),
    (EXT, "scheme http or https", ext("wss://*.containers.example.com")),
    (EXT, "port between 1 and 65535", ext("https://*.containers.example.com:99999")),
    (EXT, "port between 1 and 65535", ext("https://*.containers.example.com:0")),
    (EXT, "port between 1 and 65535", ext("https://*.containers.example.com:https")),
    (EXT, "port between 1 and 65535", ext("https://*.containers.example.com:")),
    (EXT, "no path, query or fragment", ext("https://*.containers.example.com/apps")),
    (EXT, "no path, query or fragment", ext("https://*.containers.example.com/?a=b")),
    (EXT, "no path, query or fragment", ext("https://*.containers.example.com#top")),
    (EXT, "no user name", ext("https://me@*.containers.example.com")),
    (EXT, "DNS name", ext("https://*.-bad.example.com")),
    (EXT, "DNS name", ext("https://*.*.example.com")),
    (EXT, "DNS name", ext("https://*.example.com.")),
    (EXT, "DNS name", ext("https://*.10.0.0.1")),
    (EXT, "DNS name", ext("https://*.")),
    (INT, "expected a mapping, got a list", internal(["http://127.0.0.1:8900"])),
    (INT, "expected one URL", internal({"http://127.0.0.1:8900": {}, "http://127.0.0.1:8901": {}})),
    (
        f'{INT}["https://127.0.0.1:8900"]',
        "expected an http:// URL",
        internal({"https://127.0.0.1:8900": {}}),
    ),
    (
        f'{INT}["http://ctrl.example.com:9000"]',
        "IP address",
        internal({"http://ctrl.example.com:9000": {}}),
    ),
    (
        f'{INT}["http://127.0.0.1:99999"]',
        "port between 0 and 65535",
        internal({"http://127.0.0.1:99999": {}}),
    ),
    (
        f'{INT}["http://127.0.0.1:8900/x"]',
        "only a scheme, a host and a port",
        internal({"http://127.0.0.1:8900/x": {}}),
    ),
    (f'{INT}["127.0.0.1:8900"]', "expected a URL like", internal({"127.0.0.1:8900": {}})),
    (f"{CWS}.InternalURLs[8900]", "expected a URL like", internal({8900: {}})),
    (
        f'{INT}["http://127.0.0.1:8900"]',
        "expected a mapping, got a list",
        internal({"http://127.0.0.1:8900": []}),
    ),
    (
        f'{INT}["http://127.0.0.1:8900"].ListenURL',
        "expected an http:// URL",
        internal({"http://127.0.0.1:8900": {"ListenURL": "https://0.0.0.0:8900"}}),
    ),
    (
        f'{INT}["http://127.0.0.1:8900"].ListenURL',
        "expected a URL like",
        internal({"http://127.0.0.1:8900": {"ListenURL": 8900}}),
    ),
    (AP, "expected a mapping, got a list", with_value(AP, ["Backend"])),
    (
        f"{AP}.TrustedProxy",
        "did you mean TrustedProxies?",
        with_value(f"{AP}.TrustedProxy", ["127.0.0.1/32"]),
    ),
    (f"{AP}.Listen", "Backend, Registry, TrustedProxies, Gateway", with_value(f"{AP}.Listen", "x")),
    (f"{AP}.Backend", "expected one of embedded", with_value(f"{AP}.Backend", "postgres")),
    (
        "Clusters.zzzzz.Services.Controller",
        "the backend is arvados",
        with_value(f"{AP}.Backend", "arvados"),
    ),
    (f"{AP}.Backend", "expected one of embedded", with_value(f"{AP}.Backend", None)),
    (f"{AP}.Registry", "path of a SQLite file", with_value(f"{AP}.Registry", "")),
    (f"{AP}.Registry", "path of a SQLite file", with_value(f"{AP}.Registry", ["a.sqlite"])),
    (
        f"{AP}.TrustedProxies",
        "list of networks",
        with_value(f"{AP}.TrustedProxies", "127.0.0.1/32"),
    ),
    (
        f"{AP}.TrustedProxies",
        "list of networks",
        with_value(f"{AP}.TrustedProxies", {"127.0.0.1/32": 1}),
    ),
    (
        f"{AP}.TrustedProxies[1]",
        'got "localhost"',
        with_value(f"{AP}.TrustedProxies", ["::1/128", "localhost"]),
    ),
    (
        f"{AP}.TrustedProxies[0]",
        "did you mean 10.0.0.0/8?",
        with_value(f"{AP}.TrustedProxies", ["10.0.0.1/8"]),
    ),
    (f"{AP}.TrustedProxies[0]", "got 1", with_value(f"{AP}.TrustedProxies", [1])),
    (
        f"{AP}.TrustedProxies[0]",
        'got "127.0.0.1/33"',
        with_value(f"{AP}.TrustedProxies", ["127.0.0.1/33"]),
    ),
    (f"{AP}.Gateway", 'expected a mapping, got "300s"', with_value(f"{AP}.Gateway", "300s")),
    (
        f"{AP}.Gateway.MaxClockSkw",
        "did you mean MaxClockSkew?",
        with_value(f"{AP}.Gateway.MaxClockSkw", "5m"),
    ),
    (
        f"{AP}.Gateway.MaxClockSkew",
        'got "5 minutes"',
        with_value(f"{AP}.Gateway.MaxClockSkew", "5 minutes"),
    ),
    (
        f"{AP}.Gateway.MaxClockSkew",
        "greater than zero",
        with_value(f"{AP}.Gateway.MaxClockSkew", "0s"),
    ),
    (
        f"{AP}.Gateway.MaxClockSkew",
        "greater than zero",
        with_value(f"{AP}.Gateway.MaxClockSkew", 0),
    ),
    (f"{AP}.Gateway.MaxClockSkew", 'got "-5s"', with_value(f"{AP}.Gateway.MaxClockSkew", "-5s")),
    (f"{AP}.Gateway.MaxClockSkew", "got true", with_value(f"{AP}.Gateway.MaxClockSkew", True)),
    (f"{AP}.Gateway.MaxClockSkew", "got a list", with_value(f"{AP}.Gateway.MaxClockSkew", [300])),
]

# (text, seconds)
DURATIONS: list[tuple[object, float]] = [
    ("300s", 300.0),
    ("5m", 300.0),
    ("1h30m", 5400.0),
    ("1h30m15s", 5415.0),
    ("250ms", 0.25),
    ("1.5h", 5400.0),
    (".5s", 0.5),
    ("1m0.5s", 60.5),
    ("100us", 0.0001),
    ("100µs", 0.0001),
    ("1000000ns", 0.001),
    ("300", 300.0),
    ("2.5", 2.5),
    (" 30s ", 30.0),
    (300, 300.0),
    (0.25, 0.25),
]
BAD_DURATIONS: list[object] = [
    "",
    "s",
    "5 m",
    "5d",
    "5M",
    "1h-5m",
    "-5s",
    "+5s",
    "five",
    "5s5",
    True,
    None,
    [5],
    {"s": 5},
]

# (ExternalURL, scheme, suffix, port)
EXTERNAL_URLS: list[tuple[str, str, str, int | None]] = [
    ("http://*.containers.localhost:8900", "http", "containers.localhost", 8900),
    ("https://*.containers.zzzzz.example.com", "https", "containers.zzzzz.example.com", None),
    ("https://*.containers.zzzzz.example.com/", "https", "containers.zzzzz.example.com", None),
    ("HTTPS://*.Containers.ZZZZZ.Example.COM", "https", "containers.zzzzz.example.com", None),
    ("https://*.containers.example.com:443", "https", "containers.example.com", None),
    ("http://*.containers.example.com:80", "http", "containers.example.com", None),
    ("http://*.containers.example.com:443", "http", "containers.example.com", 443),
    ("https://*.containers.example.com:80", "https", "containers.example.com", 80),
    ("https://*.containers.example.com:8443", "https", "containers.example.com", 8443),
    ("http://*.localhost", "http", "localhost", None),
    ("https://*.c-1.x2.example.com", "https", "c-1.x2.example.com", None),
]

# (ExternalURL, InternalURLs, endpoint description)
INTERNAL_URLS: list[tuple[str, object, str]] = [
    ("http://*.containers.localhost:8900", _MISSING, "tcp:8900:interface=127.0.0.1"),
    ("http://*.containers.localhost:9000", None, "tcp:9000:interface=127.0.0.1"),
    ("https://*.containers.example.com", {}, "tcp:8900:interface=127.0.0.1"),
    (
        "https://*.containers.example.com",
        {"http://127.0.0.1:8900": {}},
        "tcp:8900:interface=127.0.0.1",
    ),
    (
        "https://*.containers.example.com",
        {"http://127.0.0.1:8901/": None},
        "tcp:8901:interface=127.0.0.1",
    ),
    ("https://*.containers.example.com", {"http://0.0.0.0:9000": {}}, "tcp:9000:interface=0.0.0.0"),
    (
        "https://*.containers.example.com",
        {"http://localhost:8900": {}},
        "tcp:8900:interface=127.0.0.1",
    ),
    (
        "https://*.containers.example.com",
        {"HTTP://127.0.0.1:8900": {}},
        "tcp:8900:interface=127.0.0.1",
    ),
    ("https://*.containers.example.com", {"http://127.0.0.1": {}}, "tcp:80:interface=127.0.0.1"),
    ("https://*.containers.example.com", {"http://127.0.0.1:0": {}}, "tcp:0:interface=127.0.0.1"),
    ("https://*.containers.example.com", {"http://[::1]:8900": {}}, r"tcp:8900:interface=\:\:1"),
    ("https://*.containers.example.com", {"http://[::]:8900": {}}, r"tcp:8900:interface=\:\:"),
    (
        "https://*.containers.example.com",
        {"http://[fd00:0::5]:8900": {}},
        r"tcp:8900:interface=fd00\:\:5",
    ),
    (
        "https://*.containers.example.com",
        {"http://10.0.0.5:8900": {"ListenURL": "http://0.0.0.0:8900"}},
        "tcp:8900:interface=0.0.0.0",
    ),
    (
        "https://*.containers.example.com",
        {"https://ctrl.example.com": {"ListenURL": "http://127.0.0.1:9001"}},
        "tcp:9001:interface=127.0.0.1",
    ),
    (
        "https://*.containers.example.com",
        {"http://127.0.0.1:8902": {"ListenURL": ""}},
        "tcp:8902:interface=127.0.0.1",
    ),
]

# A cluster configuration the way Arvados writes them, with arvproxy's keys mixed in.
ARVADOS_CONFIG = """\
Clusters:
  xyzzy:
    SystemRootToken: "%(token)s"
    ManagementToken: "anothersecretanothersecretanothersecret"
    API:
      MaxItemsPerResponse: 1000
      RequestTimeout: 5m
    Collections:
      BlobSigningKey: "blobsigningkeyblobsigningkeyblobsigningkey"
      DefaultReplication: 2
    Containers:
      CloudVMs:
        Enable: true
        Driver: ec2
      LocalKeepBlobBuffersPerVCPU: 0
    PostgreSQL:
      Connection:
        host: localhost
        dbname: arvados_production
        password: pgpassword
    TLS:
      Insecure: false
      Certificate: /etc/arvados/cert.pem
    Login:
      Google:
        Enable: true
    Users:
      AutoAdminFirstUser: true
    Volumes:
      xyzzy-nyw5e-000000000000000:
        Driver: Directory
        DriverParameters: {Root: /var/lib/arvados/keep}
    Services:
      Controller:
        ExternalURL: "https://xyzzy.example.com"
        InternalURLs:
          "http://ctrl1.internal:9000": {}
          "http://ctrl2.internal:9000": {ListenURL: "http://0.0.0.0:9000"}
      RailsAPI:
        InternalURLs: {"http://localhost:8004": {}}
      Keepstore:
        InternalURLs:
          "http://keep0.internal:25107": {}
      Workbench2:
        ExternalURL: "https://workbench.xyzzy.example.com"
      ContainerWebServices:
        ExternalURL: "https://*.containers.xyzzy.example.com"
        ExternalPortMin: 0
        ExternalPortMax: 0
        InternalURLs:
          "http://10.1.2.3:8900": {ListenURL: "http://0.0.0.0:8900"}
    ArvProxy:
      TrustedProxies: [10.1.0.0/16]
      Gateway: {MaxClockSkew: 2m}
"""


class ErrorTests(SynchronousTestCase):
    """Every problem is one ConfigError naming the file and the key, never the token."""

    def write(self, text: str | bytes) -> str:
        path = self.mktemp() + ".yml"
        with open(path, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        return path

    def assertConfigError(self, path: str, *fragments: str) -> str:
        error = self.assertRaises(ConfigError, load_config, path)
        message = str(error)
        self.assertTrue(message.startswith(path + ": "), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn(TOKEN, message)
        self.assertEqual(len(message.splitlines()), 1, message)
        return message

    def test_table(self) -> None:
        """Each bad document names the file, the full key and the problem, and hides the token."""
        for key, fragment, document in ERRORS:
            with self.subTest(key=key, fragment=fragment):
                path = self.write(yaml.safe_dump(document, allow_unicode=True, sort_keys=False))
                message = self.assertConfigError(path, fragment)
                if key:
                    self.assertTrue(message.startswith(f"{path}: {key}: "), message)
                token = document_token(document)
                if isinstance(token, str) and token:
                    self.assertNotIn(token.strip(), message)

    def test_exact_message(self) -> None:
        """A non-wildcard ExternalURL gets the message the documentation promises, word for word."""
        document = with_value(f"{CWS}.ExternalURL", "https://containers.example.com")
        error = self.assertRaises(ConfigError, parse_config, document, "conf/local.yml")
        self.assertEqual(
            str(error),
            "conf/local.yml: Clusters.zzzzz.Services.ContainerWebServices.ExternalURL: expected "
            'a wildcard URL like "https://*.containers.example.com", '
            'got "https://containers.example.com"',
        )

    def test_missing_file(self) -> None:
        """A file that does not exist is named, with the reason."""
        path = self.mktemp()
        self.assertConfigError(path, "cannot read", "No such file")

    def test_directory(self) -> None:
        """A directory instead of a file is named, with the reason."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertConfigError(path, "cannot read", "directory")

    def test_unreadable(self) -> None:
        """A file the process may not read is named, with the reason."""
        path = self.write("Clusters: {}\n")

        def refuse(*args: object, **kwargs: object) -> None:
            # Root reads every file, so refuse the way the kernel would for another user.
            raise PermissionError(13, "Permission denied", path)

        self.patch(builtins, "open", refuse)
        self.assertConfigError(path, "cannot read", "Permission denied")

    def test_yaml_syntax(self) -> None:
        """A YAML syntax error names the line, without quoting the file."""
        path = self.write(f'Clusters:\n  zzzzz:\n    SystemRootToken: "{TOKEN}\n')
        self.assertConfigError(path, "not valid YAML", "line 4", "line 3")

    def test_yaml_indentation(self) -> None:
        """Bad indentation is a YAML error with its line number."""
        path = self.write(f"Clusters:\n  zzzzz:\n    SystemRootToken: {TOKEN}\n   Services: {{}}\n")
        self.assertConfigError(path, "not valid YAML", "line 4")

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are a YAML error."""
        self.assertConfigError(self.write(b"Clusters: \xff\xfe\n"), "not valid YAML")

    def test_empty_file(self) -> None:
        """An empty file is reported as such."""
        self.assertConfigError(self.write(""), "empty document")

    def test_several_clusters_unnamed(self) -> None:
        """With several clusters and no choice made, the message lists the choices."""
        document = two_clusters()
        path = self.write(yaml.safe_dump(document, sort_keys=False))
        self.assertConfigError(path, "Clusters: ", "several clusters (zzzzz, yyyyy)")

    def test_unknown_cluster(self) -> None:
        """Asking for a cluster the file lacks lists the ones it has."""
        path = self.write(yaml.safe_dump(two_clusters(), sort_keys=False))
        error = self.assertRaises(ConfigError, load_config, path, "xxxxx")
        self.assertIn('Clusters: no cluster "xxxxx"; the file has zzzzz, yyyyy', str(error))


class DurationTests(SynchronousTestCase):
    """Arvados duration strings and bare numbers of seconds."""

    def test_good(self) -> None:
        """Each duration means the number of seconds in the table."""
        for text, seconds in DURATIONS:
            with self.subTest(text=text):
                self.assertAlmostEqual(parse_duration(text), seconds)
                document = with_value(f"{AP}.Gateway.MaxClockSkew", text)
                config = parse_config(document, "test.yml")
                self.assertAlmostEqual(config.max_clock_skew, seconds)

    def test_bad(self) -> None:
        """Anything else is a ValueError."""
        for value in BAD_DURATIONS:
            with self.subTest(value=value):
                self.assertRaises(ValueError, parse_duration, value)

    def test_default(self) -> None:
        """Without a Gateway section the clock skew allowed is five minutes."""
        self.assertEqual(parse_config(minimal(), "test.yml").max_clock_skew, 300.0)

    def test_empty_gateway(self) -> None:
        """An empty Gateway section (YAML null) means the defaults."""
        config = parse_config(with_value(f"{AP}.Gateway", None), "test.yml")
        self.assertEqual(config.max_clock_skew, 300.0)


class ExternalURLTests(SynchronousTestCase):
    """Parsing the wildcard ExternalURL."""

    def test_table(self) -> None:
        """Each URL parses into its scheme, lower-case suffix and non-default port."""
        for url, scheme, suffix, port in EXTERNAL_URLS:
            with self.subTest(url=url):
                config = parse_config(with_value(f"{CWS}.ExternalURL", url), "test.yml")
                self.assertEqual(config.external_url, ExternalURL(scheme, suffix, port))

    def test_url_for(self) -> None:
        """A parsed URL builds each service's address, with the port only when needed."""
        local = parse_config(
            with_value(f"{CWS}.ExternalURL", "http://*.containers.localhost:8900"), "t.yml"
        ).external_url
        self.assertEqual(
            local.url_for("zzzzz-xvhdp-012345678901234-8888"),
            "http://zzzzz-xvhdp-012345678901234-8888.containers.localhost:8900/",
        )
        public = parse_config(minimal(), "t.yml").external_url
        self.assertEqual(public.url_for("a-1"), "https://a-1.containers.example.com/")
        self.assertEqual(public.default_port, 443)
        self.assertTrue(public.secure)


class InternalURLTests(SynchronousTestCase):
    """InternalURLs and ListenURL become the controller's Twisted endpoint description."""

    def test_table(self) -> None:
        """Each listen URL becomes the endpoint description in the table, which Twisted accepts."""
        for external, urls, expected in INTERNAL_URLS:
            with self.subTest(urls=urls):
                document = ext(external)
                if urls is not _MISSING:
                    cws = document["Clusters"]["zzzzz"]["Services"]["ContainerWebServices"]
                    cws["InternalURLs"] = urls
                config = parse_config(document, "test.yml")
                self.assertEqual(config.controller_listen, expected)
                endpoint = serverFromString(MemoryReactor(), config.controller_listen)
                interface = expected.rsplit("=", 1)[1].replace("\\", "")
                self.assertEqual(endpoint._interface, interface)  # type: ignore[attr-defined]
                self.assertEqual(
                    endpoint._port,  # type: ignore[attr-defined]
                    int(expected.split(":")[1]),
                )

    def test_listen_endpoint_reasons(self) -> None:
        """listen_endpoint says why a URL cannot be listened on."""
        for url, reason in [
            ("https://127.0.0.1:8900", "expected an http:// URL"),
            ("http://example.com:8900", "IP address"),
            ("http://[::1:8900", "expected a URL like"),
            ("tcp:8900", "expected a URL like"),
            ("http://user@127.0.0.1:8900", "only a scheme"),
        ]:
            with self.subTest(url=url):
                error = self.assertRaises(ValueError, listen_endpoint, url)
                self.assertIn(reason, str(error))


class RegistryTests(SynchronousTestCase):
    """Where the embedded registry's file is."""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.base, "conf"))
        self.path = os.path.join(self.base, "conf", "arvproxy.yml")

    def registry_for(self, value: object) -> str:
        with open(self.path, "w") as f:
            yaml.safe_dump(with_value(f"{AP}.Registry", value), f)
        return load_config(self.path).registry_path

    def test_relative(self) -> None:
        """A relative path is relative to the configuration file's directory."""
        self.assertEqual(
            self.registry_for("var/registry.sqlite"),
            os.path.join(self.base, "conf", "var", "registry.sqlite"),
        )

    def test_parent(self) -> None:
        """A path that climbs out of the configuration's directory is normalized."""
        self.assertEqual(
            self.registry_for("../var/registry.sqlite"),
            os.path.join(self.base, "var", "registry.sqlite"),
        )

    def test_absolute(self) -> None:
        """An absolute path is kept."""
        self.assertEqual(self.registry_for("/srv/arvproxy/r.sqlite"), "/srv/arvproxy/r.sqlite")

    def test_default(self) -> None:
        """Without a Registry key the file sits beside the configuration file."""
        with open(self.path, "w") as f:
            yaml.safe_dump(minimal(), f)
        self.assertEqual(
            load_config(self.path).registry_path,
            os.path.join(self.base, "conf", "arvproxy-registry.sqlite"),
        )


class WholeFileTests(SynchronousTestCase):
    """Whole configuration files: Arvados', the repository's examples, several clusters."""

    def test_minimal_defaults(self) -> None:
        """A file with only the required keys gets the documented defaults."""
        config = parse_config(minimal(), "/etc/arvados/config.yml")
        self.assertEqual(config.cluster_id, "zzzzz")
        self.assertEqual(config.system_root_token, TOKEN)
        self.assertEqual(config.controller_listen, "tcp:8900:interface=127.0.0.1")
        self.assertEqual(config.trusted_proxies, ())
        self.assertEqual(config.backend, "embedded")
        self.assertEqual(config.registry_path, "/etc/arvados/arvproxy-registry.sqlite")
        self.assertEqual(config.source, "/etc/arvados/config.yml")

    def test_repr_hides_token(self) -> None:
        """Logging a configuration does not log the SystemRootToken."""
        self.assertNotIn(TOKEN, repr(parse_config(minimal(), "t.yml")))

    def test_arvados_config(self) -> None:
        """A real Arvados config.yml, with many keys arvproxy does not use, loads."""
        path = self.mktemp() + ".yml"
        with open(path, "w") as f:
            f.write(ARVADOS_CONFIG % {"token": TOKEN})
        config = load_config(path)
        self.assertEqual(config.cluster_id, "xyzzy")
        self.assertEqual(config.system_root_token, TOKEN)
        self.assertEqual(
            config.external_url, ExternalURL("https", "containers.xyzzy.example.com", None)
        )
        self.assertEqual(config.controller_listen, "tcp:8900:interface=0.0.0.0")
        self.assertEqual(config.trusted_proxies, (ipaddress.ip_network("10.1.0.0/16"),))
        self.assertEqual(config.max_clock_skew, 120.0)

    def test_several_clusters(self) -> None:
        """With several clusters, the one asked for is used, and the others are not checked."""
        document = two_clusters()
        document["Clusters"]["broken"] = []
        self.assertEqual(parse_config(document, "t.yml", "zzzzz").cluster_id, "zzzzz")
        other = parse_config(document, "t.yml", "yyyyy")
        self.assertEqual(other.cluster_id, "yyyyy")
        self.assertEqual(other.external_url.suffix, "containers.yyyyy.example.com")

    def test_one_cluster_named(self) -> None:
        """Naming the only cluster is allowed."""
        self.assertEqual(parse_config(minimal(), "t.yml", "zzzzz").cluster_id, "zzzzz")

    def test_local_example(self) -> None:
        """conf/local.yml loads: loopback, *.localhost, the registry under the repository's var/."""
        config = load_config(os.path.join(CONF_DIR, "local.yml"))
        self.assertIsInstance(config, ClusterConfig)
        self.assertEqual(config.external_url, ExternalURL("http", "containers.localhost", 8900))
        self.assertEqual(config.controller_listen, "tcp:8900:interface=127.0.0.1")
        repository = os.path.dirname(os.path.normpath(CONF_DIR))
        self.assertEqual(config.registry_path, os.path.join(repository, "var", "registry.sqlite"))
        self.assertEqual(len(config.system_root_token), 50)

    def test_production_example(self) -> None:
        """conf/production.yml loads: https wildcard, loopback listener behind a trusted Nginx."""
        config = load_config(os.path.join(CONF_DIR, "production.yml"))
        self.assertEqual(
            config.external_url, ExternalURL("https", "containers.zzzzz.example.com", None)
        )
        self.assertEqual(config.controller_listen, "tcp:8900:interface=127.0.0.1")
        self.assertEqual(config.trusted_proxies, (ipaddress.ip_network("127.0.0.1/32"),))

    def test_nginx_example_matches(self) -> None:
        """conf/nginx-containers.conf serves production.yml's hosts and forwards to its listener."""
        config = load_config(os.path.join(CONF_DIR, "production.yml"))
        with open(os.path.join(CONF_DIR, "nginx-containers.conf")) as f:
            nginx = f.read()
        self.assertIn(f"server_name *.{config.external_url.suffix};", nginx)
        self.assertIn("proxy_pass http://127.0.0.1:8900;", nginx)
        self.assertIn("proxy_set_header Host $http_host;", nginx)


def two_clusters() -> dict[str, Any]:
    """Two valid clusters, zzzzz and yyyyy."""
    document = minimal()
    other = copy.deepcopy(document["Clusters"]["zzzzz"])
    other["Services"]["ContainerWebServices"]["ExternalURL"] = (
        "https://*.containers.yyyyy.example.com"
    )
    document["Clusters"]["yyyyy"] = other
    return document


def document_token(document: object) -> object:
    """The SystemRootToken of zzzzz in C{document}, if it has one."""
    try:
        return document["Clusters"]["zzzzz"]["SystemRootToken"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None


LIM = f"{AP}.Limits"


def limits(**values: object) -> dict[str, Any]:
    """L{minimal} with these C{ArvProxy.Limits} keys."""
    return with_value(LIM, values)


class AnonymousLimitTests(SynchronousTestCase):
    """The anonymous share of a container's connections: its defaults, and every bad value."""

    # (keys given, (cap, anonymous share, per address) they come to)
    VALUES: list[tuple[dict[str, object], tuple[int, int, int]]] = [
        ({}, (1000, 500, 100)),
        ({"MaxConnectionsPerContainer": 100}, (100, 50, 10)),
        ({"MaxConnectionsPerContainer": 3}, (3, 1, 1)),
        ({"MaxConnectionsPerContainer": 1}, (1, 0, 1)),
        ({"MaxAnonymousConnectionsPerContainer": 900}, (1000, 900, 180)),
        ({"MaxAnonymousConnectionsPerContainer": 0}, (1000, 0, 1)),
        ({"MaxAnonymousConnectionsPerAddress": 500}, (1000, 500, 500)),
        (
            {
                "MaxConnectionsPerContainer": 10,
                "MaxAnonymousConnectionsPerContainer": 6,
                "MaxAnonymousConnectionsPerAddress": 3,
            },
            (10, 6, 3),
        ),
    ]

    # (key named, what the message says, keys given)
    ERRORS: list[tuple[str, str, dict[str, object]]] = [
        (
            "MaxAnonymousConnectionsPerContainer",
            "expected fewer than MaxConnectionsPerContainer (1000)",
            {"MaxAnonymousConnectionsPerContainer": 1000},
        ),
        (
            "MaxAnonymousConnectionsPerContainer",
            "expected fewer than MaxConnectionsPerContainer (10)",
            {"MaxConnectionsPerContainer": 10, "MaxAnonymousConnectionsPerContainer": 20},
        ),
        (
            "MaxAnonymousConnectionsPerContainer",
            "at least 0, got -1",
            {"MaxAnonymousConnectionsPerContainer": -1},
        ),
        (
            "MaxAnonymousConnectionsPerContainer",
            'got "half"',
            {"MaxAnonymousConnectionsPerContainer": "half"},
        ),
        (
            "MaxAnonymousConnectionsPerContainer",
            "got 0.5",
            {"MaxAnonymousConnectionsPerContainer": 0.5},
        ),
        (
            "MaxAnonymousConnectionsPerContainer",
            "got true",
            {"MaxAnonymousConnectionsPerContainer": True},
        ),
        (
            "MaxAnonymousConnectionsPerAddress",
            "at least 1, got 0",
            {"MaxAnonymousConnectionsPerAddress": 0},
        ),
        (
            "MaxAnonymousConnectionsPerAddress",
            "expected at most MaxAnonymousConnectionsPerContainer (50), got 51",
            {"MaxAnonymousConnectionsPerContainer": 50, "MaxAnonymousConnectionsPerAddress": 51},
        ),
        (
            "MaxAnonymousConnectionPerAddress",
            "unknown key",
            {"MaxAnonymousConnectionPerAddress": 5},
        ),
    ]

    def test_values(self) -> None:
        """Given or not, the limits come to these numbers, and the budget uses them."""
        for given, expected in self.VALUES:
            with self.subTest(given):
                parsed = parse_config(limits(**given), "t.yml").limits
                self.assertEqual(
                    (
                        parsed.max_connections_per_container,
                        parsed.max_anonymous_connections_per_container,
                        parsed.max_anonymous_connections_per_address,
                    ),
                    expected,
                )
                self.assertEqual(parsed.anonymous_caps(), expected[1:])

    def test_errors(self) -> None:
        """Each bad value is one error naming the full key, at start-up."""
        for key, fragment, given in self.ERRORS:
            with self.subTest(given):
                error = self.assertRaises(ConfigError, parse_config, limits(**given), "t.yml")
                self.assertTrue(str(error).startswith(f"t.yml: {LIM}.{key}: "), str(error))
                self.assertIn(fragment, str(error))
                self.assertEqual(len(str(error).splitlines()), 1)

    def test_production_example(self) -> None:
        """conf/production.yml sets the limits its comments describe."""
        config = load_config(os.path.join(CONF_DIR, "production.yml"))
        self.assertEqual(config.limits.anonymous_caps(), (500, 100))
        self.assertEqual(config.limits.request_headers, 30.0)
