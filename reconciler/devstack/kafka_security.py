"""SASL/SCRAM users and ACLs for the local broker (``dev up --kafka-auth scram``).

The model (docs/security.md) in code: one super user, ``admin``, that creates
topics (``reconciler migrate``), users and ACLs; one SCRAM user per region, named
after the region, whose ACLs let its sidecar write only its own events topic and
the control topic, read every events topic (its peers', and its own for replay),
use only its own consumer groups and its relay's transactional id.

``region_acls`` is pure data so that the dev stack, the tests and the docs all
describe the same bindings. Passwords are random, generated once per stack and
kept in files (mode 0600) that the written config names with ``file:``, never
inline.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DevStackError

AUTH_MODES = ("none", "scram")
MECHANISM = "SCRAM-SHA-512"
ADMIN_USER = "admin"
#: the relay's transactional.id is this prefix followed by its events topic
RELAY_TRANSACTIONAL_PREFIX = "reconciler-relay."
#: throwaway groups of replay/retention readers (transport.kafka._assigned_consumer)
READER_GROUP_PREFIX = "reconciler-reader-"
_ITERATIONS = 8192


@dataclass(frozen=True)
class Acl:
    """One ALLOW binding: ``principal`` may ``operation`` on ``resource`` ``name``."""

    principal: str
    resource: str  # TOPIC, GROUP, TRANSACTIONAL_ID
    pattern: str  # LITERAL or PREFIXED
    name: str
    operation: str  # READ, WRITE, DESCRIBE

    def kafka_acls_args(self) -> str:
        """The same binding as ``kafka-acls.sh`` options, for docs and operators."""
        flag = {"TOPIC": "--topic", "GROUP": "--group", "TRANSACTIONAL_ID": "--transactional-id"}[self.resource]
        pattern = " --resource-pattern-type prefixed" if self.pattern == "PREFIXED" else ""
        operation = self.operation.title()
        return f"--add --allow-principal {self.principal} --operation {operation} {flag} {self.name}{pattern}"


def region_acls(topic_prefix: str, region: str, compensation_topic: str | None = None) -> list[Acl]:
    """What ``region``'s principal needs, and nothing more.

    No IdempotentWrite on the cluster: since Kafka 3.0 (KIP-679) WRITE on a topic is
    enough for an idempotent producer. No CREATE: topics are made by ``migrate``
    with the admin principal, so a sidecar can never create a topic a peer would
    then trust. READ on every events topic (a prefix) lets the inbox consume its
    peers and the relay and ``recover`` read back its own topic.
    """
    user = f"User:{region}"
    own_topic = f"{topic_prefix}.events.{region}"
    control = f"{topic_prefix}.control"
    acls = [
        Acl(user, "TOPIC", "LITERAL", own_topic, "WRITE"),
        Acl(user, "TOPIC", "LITERAL", control, "WRITE"),
        Acl(user, "TOPIC", "LITERAL", control, "READ"),
        # the relay publishes compensation events (docs/compensation-events.md); every
        # region writes its own copy of each, with the same id
        Acl(user, "TOPIC", "LITERAL", compensation_topic or f"{topic_prefix}.compensation", "WRITE"),
        Acl(user, "TOPIC", "PREFIXED", f"{topic_prefix}.events.", "READ"),
        Acl(user, "GROUP", "LITERAL", f"{topic_prefix}.inbox.{region}", "READ"),
        Acl(user, "GROUP", "LITERAL", f"{topic_prefix}.heartbeat.{region}", "READ"),
        Acl(user, "GROUP", "PREFIXED", READER_GROUP_PREFIX, "READ"),
        # literal, not prefixed: a prefix would also match a region whose name
        # starts with this one's ("us" and "us-east")
        Acl(user, "TRANSACTIONAL_ID", "LITERAL", f"{RELAY_TRANSACTIONAL_PREFIX}{own_topic}", "WRITE"),
        Acl(user, "TRANSACTIONAL_ID", "LITERAL", f"{RELAY_TRANSACTIONAL_PREFIX}{own_topic}", "DESCRIBE"),
    ]
    return acls


def server_properties(port: int, controller_port: int, admin_password: str) -> dict[str, str]:
    """Broker settings that replace the PLAINTEXT listener with SASL_PLAINTEXT + SCRAM.

    The controller listener stays PLAINTEXT on loopback (KRaft cannot authenticate
    controllers with SCRAM: the credentials live in the metadata they serve), so its
    ANONYMOUS principal must be a super user for the broker to register. Clients
    only ever get the SASL port.
    """
    jaas = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{ADMIN_USER}" password="{admin_password}";'
    )
    return {
        "listeners": f"SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{port}",
        "inter.broker.listener.name": "SASL_PLAINTEXT",
        "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
        "sasl.enabled.mechanisms": MECHANISM,
        "sasl.mechanism.inter.broker.protocol": MECHANISM,
        # the broker's own connections (transaction markers) authenticate as admin
        f"listener.name.sasl_plaintext.{MECHANISM.lower()}.sasl.jaas.config": jaas,
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": f"User:{ADMIN_USER};User:ANONYMOUS",
    }


class Credentials:
    """Random SCRAM passwords, one file per user under ``secrets_dir`` (0700/0600)."""

    def __init__(self, secrets_dir: Path) -> None:
        self.secrets_dir = secrets_dir

    def path(self, user: str) -> Path:
        return self.secrets_dir / f"{user}.password"

    def password(self, user: str) -> str:
        """The user's password, generated on first use and kept for later starts."""
        path = self.path(user)
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        value = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value + "\n")
        return value

    def client_settings(self, bootstrap: str, user: str) -> dict[str, str]:
        return {
            "bootstrap.servers": bootstrap,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": MECHANISM,
            "sasl.username": user,
            "sasl.password": self.password(user),
        }


def provision(
    admin_settings: Mapping[str, str],
    credentials: Credentials,
    topic_prefix: str,
    regions: Sequence[str],
    timeout: float = 30.0,
) -> None:
    """Create (or update) every region's SCRAM user and ACLs; idempotent."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AclBinding,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialUpsertion,
    )

    client = AdminClient({**admin_settings, "log_level": 0})
    upserts: list[Any] = [
        UserScramCredentialUpsertion(
            region,
            ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, _ITERATIONS),
            credentials.password(region).encode(),
        )
        for region in regions
    ]
    bindings = [
        AclBinding(
            ResourceType[acl.resource], acl.name, ResourcePatternType[acl.pattern], acl.principal, "*",
            AclOperation[acl.operation], AclPermissionType.ALLOW,
        )
        for region in regions
        for acl in region_acls(topic_prefix, region)
    ]
    try:
        for user, future in client.alter_user_scram_credentials(upserts, request_timeout=timeout).items():
            _wait(future, timeout, f"creating SCRAM user {user}")
        for binding, future in client.create_acls(bindings, request_timeout=timeout).items():
            _wait(future, timeout, f"creating ACL {binding}")
    except KafkaException as exc:
        raise DevStackError(f"provisioning Kafka users and ACLs failed: {exc}") from exc


def _wait(future: Any, timeout: float, what: str) -> None:
    try:
        future.result(timeout)
    except Exception as exc:  # noqa: BLE001 - any failure here is a stack problem with its cause named
        raise DevStackError(f"{what} failed: {exc}") from exc


def wait_for_login(settings: Mapping[str, str], deadline_s: float = 30.0) -> None:
    """Poll until ``settings`` authenticate: a new SCRAM user reaches the broker
    through the metadata log a moment after the controller accepted it."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    client = AdminClient({**settings, "log_level": 0})
    end = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < end:
        try:
            client.list_topics(timeout=3)
            return
        except KafkaException as exc:
            last = str(exc)
        time.sleep(0.2)
    raise DevStackError(f"Kafka user {settings.get('sasl.username')} cannot log in after {deadline_s:.0f}s: {last}")
