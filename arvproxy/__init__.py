"""
arvproxy: reach web services running inside containers from a browser, safely.

The front door (L{arvproxy.controller}) authorizes each request and forwards it, signed, to the
node gateway (L{arvproxy.gateway}) beside the container, which verifies it and proxies it to the
port inside the container.  Both obey the shared policy in L{arvproxy.policy}.
"""

__version__ = "0.1.0.dev0"
