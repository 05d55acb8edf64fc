from twisted.application.service import ServiceMaker

controller = ServiceMaker(
    "arv-controller-proxy",
    "arvproxy.controller.tap",
    "The front door: authorize and forward requests to container web services",
    "arv-controller-proxy",
)
gateway = ServiceMaker(
    "crunch-run-gateway",
    "arvproxy.gateway.tap",
    "The node gateway beside one container: verify signed requests and proxy them in",
    "crunch-run-gateway",
)
dispatcher = ServiceMaker(
    "arv-local-dispatcher",
    "arvproxy.dispatcher",
    "Run the embedded registry's queued containers here, one crunch-run-gateway each",
    "arv-local-dispatcher",
)
node_dispatcher = ServiceMaker(
    "arv-node-dispatcher",
    "arvproxy.nodedispatcher",
    "Run this compute node's share of an Arvados cluster's containers, one gateway each",
    "arv-node-dispatcher",
)
