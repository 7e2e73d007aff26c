"""The drill reads runbooks as procedures: shell blocks parsed, commands adapted."""

from __future__ import annotations

import socket
import threading

from reconciler.drills.proxy import TcpProxy
from reconciler.drills.runbook import adapt, find_runbook, region_mapping, runbook_commands

TEXT = """
# Something

```shell
reconciler status --config /etc/reconciler/reconciler.yaml
# a comment
reconciler recover --config /etc/reconciler/reconciler.yaml \\
    --region us-east --dry-run
```

```promql
reconciler_peer_state{peer="us-east"} == 1
```

```sh
reconciler fence --config /etc/reconciler/reconciler.yaml --region us-east --reason "INC-1: us-east down"
reconciler diff --config /etc/reconciler/reconciler.yaml --table orders --regions us-east,eu-west
```
"""


def test_shell_blocks_become_commands_with_continuations_joined() -> None:
    commands = runbook_commands(TEXT, "x.md")
    assert [c.subcommand for c in commands] == ["status", "recover", "fence", "diff"]
    assert commands[1].argv[-3:] == ("--region", "us-east", "--dry-run")
    assert commands[1].where == "x.md:7"


def test_adapt_rewrites_config_and_regions_but_not_free_text() -> None:
    commands = runbook_commands(TEXT)
    mapping = region_mapping("ap-south", ["us-east", "eu-west", "ap-south"])
    assert mapping == {"us-east": "ap-south", "eu-west": "us-east", "ap-south": "eu-west"}
    fence = adapt(commands[2], "/tmp/drill.yaml", mapping)
    assert fence[fence.index("--config") + 1] == "/tmp/drill.yaml"
    assert fence[fence.index("--region") + 1] == "ap-south"
    assert fence[-1] == "INC-1: us-east down"
    diff = adapt(commands[3], "/tmp/drill.yaml", mapping)
    assert diff[-1] == "ap-south,us-east"


def test_the_failover_runbooks_have_what_the_drill_runs() -> None:
    for name, wanted in (("regional-failover.md", {"status", "gaps"}),
                         ("failback-and-reconcile.md", {"status", "gaps", "recover", "run"})):
        found = {c.subcommand for c in runbook_commands(find_runbook(name).read_text())}
        assert wanted <= found, name


def test_proxy_cut_resets_connections_and_refuses_until_healed() -> None:
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        try:
            while data := conn.recv(1024):
                conn.sendall(data)
        except OSError:
            pass  # the proxy reset it: that is the point

    def echo() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()
    with TcpProxy("127.0.0.1", server.getsockname()[1]) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
        assert proxy.cut() == 2  # both halves of the one proxied connection
        try:
            gone = client.recv(4) == b""
        except ConnectionResetError:
            gone = True
        assert gone
        try:
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
            refused = False
        except OSError:
            refused = True
        assert refused
        proxy.heal()
        again = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        again.sendall(b"pong")
        assert again.recv(4) == b"pong"
        again.close()
        client.close()
    server.close()
