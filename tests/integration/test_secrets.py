"""No secret reaches any output: every command, unreachable servers, bad configs.

Secrets are planted in every form a config can carry them (URL, key=value, a URL
with an IPv6 host and a percent-encoded password, ``${ENV}`` and ``file:``
values, Kafka credentials) and in DSNs that no parser accepts (one slash short,
a mistyped scheme, bad percent-encoding, an unterminated quote). Every command is
then run as an operator runs it, in a subprocess, text and ``--json``, against
servers that refuse connections (closed ports on 127.0.0.1), and its whole stdout
and stderr (where logs and librdkafka's own messages go) is searched for each
secret, raw and URL-encoded. The running sidecar's /metrics, /healthz and /readyz
are searched too.

Needs no stack: nothing here may connect anywhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

RECONCILER = [sys.executable, "-m", "reconciler.cli"]

#: every secret planted, by where it sits; distinctive so that a hit is never chance
SECRETS = {
    "url": "UrlPw-7f3kq",
    "url_query": "SslKeyPw-x81v",
    "keyword": "Kw Pw-9d2mz",  # a space: quoted in the key=value DSN
    "ipv6": "V6@Pw-4hh0c",  # an '@', percent-encoded in the URL
    "env_dsn": "EnvPw-2bq7s",
    "file_dsn": "FilePw-6tt1w",
    "sasl": "SaslPw-3ne8d",
    "sasl_env": "SaslEnvPw-1cv5",
    "oauth": "OauthSecret-0pq2",
    "ssl_key_file": "SslKeyFilePw-5zr",
    "adhoc_a": "AdHocA-8ku3",
    "adhoc_b": "AdHocB-9mm4",
    # in DSNs that no parser accepts
    "typo_slash": "TypoSlash-5wd1",
    "typo_scheme": "TypoScheme-2rr8",
    "bad_percent": "BadPct-%zz7",
    "unterminated": "Unterm Pw-4jj6",
    "typo_env": "TypoEnv-3ks9",
    "typo_file": "TypoFile-7bn2",
}


def closed_port() -> int:
    """A loopback port nothing listens on (taken from the kernel, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Planted:
    root: Path
    env: dict[str, str]
    good: Path
    bad: dict[str, Path]  # config file -> the region whose dsn is broken
    bad_region: dict[str, str]
    adhoc_a: str
    adhoc_b: str


TABLES = "tables:\n  orders: {key: id}\n"


def _config(kafka: str, regions: dict[str, str], region_extra: str = "") -> str:
    lines = [kafka, "regions:"]
    for name, dsn in regions.items():
        lines.append(f"  {name}:\n    dsn: {json.dumps(dsn)}\n    metrics_address: 127.0.0.1:0")
    return "\n".join(lines) + region_extra + "\n" + TABLES


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("secrets")
    p = [closed_port() for _ in range(6)]
    s = SECRETS
    (root / "dsn-secret").write_text(f"host=127.0.0.1 port={p[4]} user=app password={s['file_dsn']} dbname=db\n")
    (root / "ssl-key-password").write_text(s["ssl_key_file"] + "\n")
    (root / "typo-dsn").write_text(f"postgresql:/app:{s['typo_file']}@127.0.0.1:{p[0]}/db\n")
    env = {
        **os.environ,
        "H1_ENV_DSN": f"postgresql://app:{s['env_dsn']}@127.0.0.1:{p[3]}/db",
        "H1_SASL_PASSWORD": s["sasl_env"],
        "H1_TYPO_DSN": f"postgres:/app:{s['typo_env']}@127.0.0.1:{p[0]}/db",
    }
    env.pop("RECONCILER_CONFIG", None)
    kafka = (
        "kafka:\n"
        f"  bootstrap.servers: 127.0.0.1:{p[5]}\n"
        "  security.protocol: SASL_PLAINTEXT\n"
        "  sasl.mechanisms: PLAIN\n"
        "  sasl.username: app\n"
        "  sasl.password: ${H1_SASL_PASSWORD}\n"
        f"  sasl.oauthbearer.client.secret: {s['oauth']}"
    )
    regions = {
        "us-east": f"postgresql://app:{s['url']}@127.0.0.1:{p[0]}/db?sslmode=disable&sslpassword={s['url_query']}",
        "eu-west": f"host=127.0.0.1 port={p[1]} user=app password='{s['keyword']}' dbname=db",
        "ap-south": f"postgresql://app:{quote(s['ipv6'], safe='')}@[::1]:{p[2]}/db",
        "sa-east": "${H1_ENV_DSN}",
        "af-south": f"file:{root / 'dsn-secret'}",
    }
    # a per-region Kafka credential from a secret file; the kafka line must follow us-east's block
    good_text = _config(kafka, regions).replace(
        "    metrics_address: 127.0.0.1:0\n  eu-west:",
        f"    metrics_address: 127.0.0.1:0\n    kafka:\n      ssl.key.password: file:{root / 'ssl-key-password'}\n"
        "  eu-west:",
        1,
    )
    good = root / "good.yaml"
    good.write_text(good_text)
    broken = {
        "typo-slash": ("eu-west", f"postgresql:/app:{s['typo_slash']}@127.0.0.1:{p[1]}/db"),
        "typo-scheme": ("eu-west", f"postgresq://app:{s['typo_scheme']}@127.0.0.1:{p[1]}/db"),
        "bad-percent": ("eu-west", f"postgresql://app:{s['bad_percent']}@127.0.0.1:{p[1]}/db"),
        "unterminated": ("eu-west", f"host=127.0.0.1 port={p[1]} password='{s['unterminated']}"),
        "typo-env": ("eu-west", "${H1_TYPO_DSN}"),
        "typo-file": ("eu-west", f"file:{root / 'typo-dsn'}"),
    }
    bad: dict[str, Path] = {}
    bad_region: dict[str, str] = {}
    for name, (region, dsn) in broken.items():
        path = root / f"{name}.yaml"
        path.write_text(_config(kafka, {"us-east": regions["us-east"], region: dsn}))
        bad[name] = path
        bad_region[name] = region
    return Planted(
        root=root, env=env, good=good, bad=bad, bad_region=bad_region,
        adhoc_a=f"postgresql:/app:{s['adhoc_a']}@127.0.0.1:{p[0]}/db",  # one slash short
        adhoc_b=f"host=127.0.0.1 port={p[1]} password={s['adhoc_b']} dbname=db",
    )


def forms() -> dict[str, str]:
    """Each secret as it may be printed: as is, and URL-encoded."""
    out = {}
    for name, secret in SECRETS.items():
        out[name] = secret
        out[f"{name} (url-encoded)"] = quote(secret, safe="")
    return out


def leaks(text: str) -> list[str]:
    return [f"{name}: {form!r}" for name, form in forms().items() if form in text]


@dataclass
class Ran:
    args: list[str]
    returncode: int
    output: str


def run_cli(planted: Planted, args: list[str], timeout: float = 90) -> Ran:
    proc = subprocess.run(
        [*RECONCILER, *args], cwd=planted.root, env=planted.env, capture_output=True, text=True, timeout=timeout,
    )
    return Ran(args, proc.returncode, proc.stdout + proc.stderr)


def commands(config: Path) -> list[list[str]]:
    c = ["--config", str(config)]
    both = [
        ["status", *c],
        ["gaps", *c],
        ["diff", "--table", "orders", *c],
        ["recover", "--region", "us-east", "--dry-run", *c],
        ["conflicts", "list", *c],
        ["conflicts", "list", "--region", "eu-west", *c],
        ["conflicts", "show", "1", "--region", "ap-south", *c],
        ["quarantine", "list", "--region", "af-south", *c],
        ["prune", "--region", "us-east", "--dry-run", *c],
        ["prune", "--region", "sa-east", "--dry-run", *c],
        ["migrate", *c],
    ]
    return [
        *both,
        *([*cmd, "--json"] for cmd in both),
        ["fence", "--region", "eu-west", "--reason", "test", "--yes", *c],
        ["activate", "--region", "ap-south", "--force", "--reason", "test", "--yes", *c],
    ]


def run_all(planted: Planted, argvs: list[list[str]]) -> list[Ran]:
    # gaps waits for Kafka's timeout (10 s): run a few at once
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda a: run_cli(planted, a), argvs))


def test_no_command_prints_a_secret_against_unreachable_servers(planted: Planted) -> None:
    argvs = [
        *commands(planted.good),
        ["diff", "--dsn-a", planted.adhoc_a, "--dsn-b", planted.adhoc_b, "--table", "t", "--key", "id"],
        ["diff", "--dsn-a", planted.adhoc_b, "--dsn-b", planted.adhoc_a, "--table", "t", "--key", "id", "--json"],
        ["diff", "--dsn-a", planted.adhoc_b, "--dsn-b", planted.adhoc_a, "--table", "t", "--key", "id",
         "--full-scan"],
        ["drill", "--list"],
        ["drill", "--list", "--json"],
        ["--version"],
    ]
    found = {}
    for ran in run_all(planted, argvs):
        assert ran.returncode in (0, 1, 2), (ran.args, ran.output)
        if hit := leaks(ran.output):
            found[" ".join(ran.args)] = (hit, ran.output[-2000:])
    assert not found, found
    # the commands did reach the code that shows a DSN: status names every region, masked
    status = run_cli(planted, ["status", "--json", "--config", str(planted.good)])
    doc = json.loads(status.output[: status.output.rindex("}") + 1])
    assert {r["state"] for r in doc["regions"].values()} == {"DOWN"}
    assert all("***" in r["dsn"] for r in doc["regions"].values()), doc["regions"]


@pytest.mark.parametrize(
    "name", ["typo-slash", "typo-scheme", "bad-percent", "unterminated", "typo-env", "typo-file"]
)
def test_a_malformed_dsn_is_refused_at_load_naming_region_key_and_file(planted: Planted, name: str) -> None:
    config = planted.bad[name]
    key = f"regions.{planted.bad_region[name]}.dsn"
    text = run_cli(planted, ["status", "--config", str(config)])
    as_json = run_cli(planted, ["status", "--json", "--config", str(config)])
    for ran in (text, as_json):
        assert ran.returncode == 2, ran.output
        assert key in ran.output and str(config) in ran.output, ran.output
        assert not leaks(ran.output), (leaks(ran.output), ran.output)
    error = json.loads(as_json.output.strip().splitlines()[-1])
    assert error["error"] == "ConfigError" and error["context"]["key"] == key


def test_every_command_with_a_malformed_dsn_prints_no_secret(planted: Planted) -> None:
    found = {}
    config = planted.bad["typo-slash"]
    argvs = [*commands(config), ["run", "--region", "us-east", "--config", str(config)]]
    for ran in run_all(planted, argvs):
        assert ran.returncode == 2, (ran.args, ran.output)
        if hit := leaks(ran.output):
            found[" ".join(ran.args)] = (hit, ran.output[-2000:])
    assert not found, found


def test_the_sidecar_logs_and_metrics_carry_no_secret(planted: Planted) -> None:
    proc = subprocess.Popen(
        [*RECONCILER, "run", "--region", "us-east", "--config", str(planted.good)],
        cwd=planted.root, env=planted.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    pages: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        address = None
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if match := re.search(r'"metrics":"(127\.0\.0\.1:\d+)"', line):
                address = match.group(1)
        assert address, "".join(lines)
        for path in ("/metrics", "/healthz", "/readyz"):
            try:
                with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
                    pages[path] = response.read().decode()
            except urllib.error.HTTPError as exc:  # /readyz is 503 while not ACTIVE
                pages[path] = exc.read().decode()
        # a few seconds of retry logs against the unreachable database and broker
        until = time.monotonic() + 3
        while time.monotonic() < until:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            # draining towards a broker that never answers takes its full timeout
            proc.kill()
            rest, _ = proc.communicate()
        lines.append(rest or "")
    log = "".join(lines)
    assert "sidecar started" in log and "***" in log, log[:2000]
    assert "reconciler_" in pages["/metrics"]
    for where, text in {"log": log, **pages}.items():
        assert not leaks(text), (where, leaks(text))
