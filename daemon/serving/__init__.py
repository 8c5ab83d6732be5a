"""The socket and process side: the ZeroMQ socket loop (server), systemd's notifications (notify),
the Prometheus export (prometheus), and the same daemon without a socket (inprocess). Nothing below
this room knows a transport: it reaches the rest through `daemon.core.Core`."""
