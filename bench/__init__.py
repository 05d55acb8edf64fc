"""
C{make bench}: arvproxy's chain measured side by side with the service reached directly, with
Nginx built as the same two-hop chain, and with the same chain built from node's C{http-proxy}.

Run it with C{python -m bench} (C{--quick} for a short smoke run, C{--help} for the rest).  It
starts every process it measures on loopback, stops them all when it ends (also on Ctrl-C or an
error), prints a table of figures and ratios and writes C{bench/RESULTS.md}.

Modules: L{bench.procs} (processes, RSS, CPU, open files), L{bench.chains} (the backend and the
four ways to reach it), L{bench.load} (wrk, the fixed-rate latency probe, bulk transfers, the slow
reader), L{bench.idle_ws} (the idle WebSocket test), L{bench.sink} and L{bench.wsecho} (the
backend's upload sink and WebSocket echo, each a process of its own), L{bench.report}.
"""
