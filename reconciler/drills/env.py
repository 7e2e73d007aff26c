"""An isolated environment per drill on the local stack, and its removal.

Each drill gets fresh databases (one per region, on that region's own PostgreSQL
server, so killing a server kills exactly one region) and its own Kafka topic
prefix and consumer groups, so drills never see each other's events or the
events of tests running on the same stack. ``cleanup()`` drops all of it.

Two configs describe the same environment: ``config`` is what every component,
sidecar and operator command of the drill uses; ``direct`` differs only where a
region is reached through a cuttable proxy (the partition drill), and points at
the real server. The region's own users write through ``direct`` (they sit next
to their database), and so does the checker, which must read the truth.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, load_config
from ..devstack import DevStack
from ..errors import ReconcilerError
from ..provision import migrate
from ..store.inspection import Inspector, create_database, drop_database
from ..transport import kafka
from .proxy import TcpProxy

#: the checkout demo domain, as `reconciler dev up` configures it
DEMO_TABLES: dict[str, dict[str, Any]] = {
    "orders": {"key": ["id"], "policy": "lww"},
    "inventory": {"key": ["sku"], "policy": "merge", "fields": {"stock": "counter", "tags": "set"}},
    "payments": {"key": ["id"], "policy": "manual"},
}

#: the recovery gate tolerates an in-flight tail this long: drills recover under live
#: traffic, where a few hundred events are always on their way (the default of 0
#: only ever passes on an idle system)
DRILL_LIFECYCLE = {"max_lag_events": 500, "max_lag_seconds": 10.0, "absence_threshold_seconds": 30.0}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_database(dsn: str, database: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/" + database


def _with_port(dsn: str, port: int) -> str:
    head, _, tail = dsn.rpartition(":")
    return f"{head}:{port}/{tail.split('/', 1)[1]}"


@dataclass
class DrillEnv:
    stack: DevStack
    tag: str
    workdir: Path
    config: Config
    direct: Config
    proxies: dict[str, TcpProxy] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)

    @property
    def regions(self) -> list[str]:
        return list(self.config.regions)

    @classmethod
    def create(
        cls, stack: DevStack, workdir: Path, *, proxied: tuple[str, ...] = (), ddl: tuple[str, ...] = (),
        **overrides: Any,
    ) -> DrillEnv:
        tag = "drill" + uuid.uuid4().hex[:10]
        workdir.mkdir(parents=True, exist_ok=True)
        env = cls.__new__(cls)
        env.stack, env.tag, env.workdir, env.proxies, env.created = stack, tag, workdir, {}, []
        try:
            direct_regions: dict[str, dict[str, Any]] = {}
            drill_regions: dict[str, dict[str, Any]] = {}
            for region in stack.regions:
                admin = stack.dsn(region)
                dsn = _with_database(admin, tag)
                create_database(admin, tag)
                env.created.append(region)
                if ddl:  # the scenario's own tables, before migrate installs what they need
                    Inspector(dsn, region, timeout=10).execute(*ddl)
                doc = {"dsn": dsn, "metrics_address": f"127.0.0.1:{free_port()}"}
                direct_regions[region] = doc
                if region in proxied:
                    proxy = TcpProxy("127.0.0.1", stack.pg_port(region)).start()
                    env.proxies[region] = proxy
                    doc = {**doc, "dsn": _with_port(dsn, proxy.port)}
                drill_regions[region] = doc
            base: dict[str, Any] = {
                "topic_prefix": tag,
                "hlc": {"max_offset_ms": 1000},
                # librdkafka would print every refused reconnect while a drill has the broker
                # down; failures still surface through the client API, which is what counts
                "kafka": {"bootstrap.servers": stack.bootstrap_servers, "log_level": "2"},
                "tables": DEMO_TABLES,
                "batch": {"relay": 200, "apply": 200},
                "lifecycle": dict(DRILL_LIFECYCLE),
            }
            base.update(overrides)
            env.config = _write(workdir / "drill.yaml", {**base, "regions": drill_regions})
            env.direct = _write(workdir / "direct.yaml", {**base, "regions": direct_regions})
            migrate(env.direct, demo_tables=True)
        except BaseException:
            env.cleanup()
            raise
        return env

    def cleanup(self) -> list[str]:
        """Drop the databases, topics and consumer groups; returns what could not be
        removed (reported, never raised: cleanup must not hide the drill's verdict)."""
        problems: list[str] = []
        for proxy in self.proxies.values():
            proxy.close()
        for region in self.created:
            try:
                drop_database(self.stack.dsn(region), self.tag)
            except ReconcilerError as exc:
                problems.append(f"drop database {self.tag} in {region}: {exc}")
        self.created = []
        try:
            client = kafka.admin({"bootstrap.servers": self.stack.bootstrap_servers})
            topics = [t for t in client.list_topics(timeout=10).topics if t.startswith(self.tag + ".")]
            if topics:
                for future in client.delete_topics(topics, operation_timeout=15).values():
                    with contextlib.suppress(Exception):
                        future.result(15)
            groups = [f"{self.tag}.{kind}.{r}" for kind in ("inbox", "heartbeat") for r in self.stack.regions]
            for future in client.delete_consumer_groups(groups, request_timeout=10).values():
                with contextlib.suppress(Exception):  # a group never joined does not exist
                    future.result(10)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            problems.append(f"delete topics/groups {self.tag}.*: {exc}")
        return problems


def _write(path: Path, doc: dict[str, Any]) -> Config:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_config(path)
