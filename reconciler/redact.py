"""Secrets kept out of everything reconciler prints: errors, logs, JSON, screens.

Three layers, because any one of them can be bypassed by a string nobody expected:

1. Structure. A DSN is shown through :func:`reconciler.store.dsn.redact_dsn` and
   Kafka settings through :func:`safe_kafka_settings`, which know where the
   secrets sit.
2. The registry. Loading a config remembers every secret it resolved (DSN
   passwords, Kafka credentials; written in the file, taken from ``${ENV}`` or
   read from a ``file:``), and :func:`scrub` masks each of them wherever it
   appears in free text, also in the forms quoting gives it (URL-encoded,
   JSON- or repr-escaped). A driver message that quotes a password is caught
   here even though nothing about it looks like a credential.
3. Shapes. Text that looks like it carries a credential (``user:pw@`` after
   any scheme, or none; ``password=...``; ``"sasl.password": "..."``) is masked
   even when no config registered it: a mistyped DSN is not a URL and not
   key=value pairs, so no parser finds its password, but this does.

When in doubt these functions mask too much rather than too little. Pure string
code: no driver imports, so anything may use it.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

MASK = "***"

#: shorter registered secrets are masked only where their position marks them (a
#: DSN's password, a secret Kafka key): masking every "ab" in every line would
#: make output unreadable without protecting anything a 3-letter password has
MIN_SCRUB_LENGTH = 4

#: librdkafka (and Java client) property names whose values are credentials
_SECRET_KAFKA_KEY = re.compile(r"password|secret|jaas|oauthbearer\.config|token|credential|ssl\.key\.pem", re.I)

# the names that mark a value as a secret in free text (key=value, key: value, "key": "value")
_SECRET_WORD = r"[A-Za-z0-9_.\-]*(?:password|passwd|secret|jaas\.config|oauthbearer\.config)[A-Za-z0-9_.\-]*"
# Both patterns only start where a token starts (the lookbehinds): tried at every
# character, a long run without spaces would cost quadratic time, and these run on
# every error and log line, whatever text a peer or a driver put in it.
_KEYED_SECRET = re.compile(
    rf"""(?<![A-Za-z0-9_.\-])(?P<key>(?P<q>["']?){_SECRET_WORD}(?P=q)\s*[=:]\s*)"""
    r"""(?P<value>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|'[^'"\n]*|[^\s,;&}\]"']+)""",
    re.IGNORECASE,
)
# user:password@ after an optional scheme with any number of slashes (a typo such as
# "postgresql:/u:pw@h" is not a URL to any parser); the password runs to the last
# '@' before a space or quote, as an unencoded '@' in a password is common. "//" never
# starts a password: "postgresql://u@h" is a scheme and a user, not user "postgresql"
# starts "=a:b=a:b..." each scan ahead, so user and password are bounded: an
# unregistered password of more than 256 characters is not recognised by its shape.
_USERINFO = re.compile(
    r"""(?<![^\s'"=,;(\[{<])(?P<head>(?:[A-Za-z][A-Za-z0-9+.\-]*:/{0,3})?[^\s/:@'"=]{0,256}:)"""
    r"""(?P<pw>(?!//)[^\s'"]{0,256})@"""
)

_JSON_LITERAL = re.compile(r"^(?:-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)$")

_lock = threading.Lock()
_registered: set[str] = set()
_forms: tuple[str, ...] = ()


def is_secret_kafka_key(key: str) -> bool:
    """Whether a Kafka client property holds a credential (sasl.password, ssl.key.password, ...)."""
    return bool(_SECRET_KAFKA_KEY.search(key))


def safe_kafka_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Kafka settings as they may be shown: every credential's value masked."""
    return {k: (MASK if is_secret_kafka_key(k) else v) for k, v in settings.items()}


def register(values: Iterable[str | None]) -> None:
    """Remember secrets, so that :func:`scrub` masks them in any text from now on."""
    with _lock:
        global _forms
        before = len(_registered)
        for value in values:
            if not value:
                continue
            _registered.add(value)
            # a multi-line secret (a PEM key) may be quoted one line at a time
            _registered.update(line.strip() for line in value.splitlines() if line.strip())
        if len(_registered) != before:
            forms: set[str] = set()
            for secret in _registered:
                if len(secret) >= MIN_SCRUB_LENGTH:
                    forms.update(_quoted_forms(secret))
            # longest first: a form that contains another must be replaced whole
            _forms = tuple(sorted(forms, key=len, reverse=True))


def _quoted_forms(secret: str) -> set[str]:
    return {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
    }


def scrub(text: str) -> str:
    """``text`` with every registered secret and every credential-shaped value masked."""
    if not text:
        return text
    for form in _forms:
        if form in text:
            text = text.replace(form, MASK)
    text = _USERINFO.sub(_mask_userinfo, text)
    return _KEYED_SECRET.sub(_mask_keyed, text)


def _mask_userinfo(match: re.Match[str]) -> str:
    return match.group("head") + MASK + "@"


def _mask_keyed(match: re.Match[str]) -> str:
    value = match.group("value")
    if match.group("q") == '"' and _JSON_LITERAL.match(value):
        return match.group(0)  # a number or true/false/null in a JSON document: no secret, and JSON stays JSON
    quote_char = value[0] if value[:1] in ("'", '"') else ""
    # keep the quotes of a quoted value so a JSON document stays JSON
    return match.group("key") + quote_char + MASK + (quote_char if len(value) > 1 and value[-1] == quote_char else "")


def scrub_value(value: Any) -> Any:
    """A JSON-like document with every string in it scrubbed."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {k: scrub_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_value(v) for v in value]
    return value


class ScrubbingStream:
    """A text stream that scrubs what is written through it, and is otherwise its inner stream.

    ``buffer`` is hidden on purpose: a writer that found it would bypass the scrub.
    """

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        if isinstance(text, str):
            self.inner.write(scrub(text))
            return len(text)
        return self.inner.write(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self.inner, name)


def guard_standard_streams() -> None:
    """Scrub everything written to sys.stdout and sys.stderr from now on (idempotent).

    The CLI's last line of defence: whatever a command, a library or a traceback
    prints passes through :func:`scrub` on its way out.
    """
    if not isinstance(sys.stdout, ScrubbingStream):
        sys.stdout = ScrubbingStream(sys.stdout)
    if not isinstance(sys.stderr, ScrubbingStream):
        sys.stderr = ScrubbingStream(sys.stderr)
