"""Connection strings made safe to show.

Error messages, logs and reports name the database they talk about, and a DSN is
the natural name -- but it may carry a password. Everything that prints a DSN goes
through :func:`redact_dsn`; text that may quote one (a driver's message) goes
through :func:`scrub`. Both are pure string functions, deliberately independent of
the driver, so they also work on strings the driver would reject.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote

from .. import redact

MASK = "***"
#: libpq keywords whose values are secrets
SECRET_KEYS = frozenset({"password", "sslpassword"})

# libpq takes only postgres(ql):// as a URL, but any scheme:// is redacted as one: a
# DSN with a mistyped scheme still carries its password in the user info
_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>.*)$", re.DOTALL)
_KV_TOKEN_RE = re.compile(r"\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*")


def redact_dsn(dsn: str) -> str:
    """The DSN with every password replaced by ``***``; other parts unchanged.

    Handles both libpq forms: URLs (``postgresql://user:secret@host/db?sslpassword=x``)
    and keyword/value strings (``host=h password='se cret'``). A string that cannot be
    parsed keeps only the well-formed pairs before the fault and loses the rest
    (``postgresql:/u:pw@h``, one slash short, becomes ``***``), rather than risk
    printing a password nobody can locate.
    """
    m = _URL_RE.match(dsn)
    if m:
        return m.group("scheme") + _redact_url_rest(m.group("rest"))
    return _redact_keyword_value(dsn)


def password_of(dsn: str) -> list[str]:
    """The secrets a DSN carries (decoded), for scrubbing them out of free text."""
    secrets: list[str] = []
    m = _URL_RE.match(dsn)
    if m:
        authority, _, query = _split_url(m.group("rest"))
        userinfo, at, _hosts = authority.rpartition("@")
        if at and ":" in userinfo:
            secrets.append(unquote(userinfo.split(":", 1)[1]))
        secrets.extend(v for k, v in parse_qsl(query, keep_blank_values=True) if k in SECRET_KEYS)
    else:
        pairs, _complete = _parse_keyword_value(dsn)
        secrets.extend(v for k, v in pairs if k in SECRET_KEYS)
    return [s for s in secrets if s]


def secret_forms(dsn: str) -> list[str]:
    """The DSN's secrets decoded and as written in it (a URL may percent-encode any character)."""
    forms = password_of(dsn)
    m = _URL_RE.match(dsn)
    if m:
        authority, _, query = _split_url(m.group("rest"))
        userinfo, at, _hosts = authority.rpartition("@")
        if at and ":" in userinfo:
            forms.append(userinfo.split(":", 1)[1])
        for item in query.split("&"):
            key, eq, value = item.partition("=")
            if eq and unquote(key) in SECRET_KEYS:
                forms.append(value)
    return [f for f in dict.fromkeys(forms) if f]


def scrub(text: str, dsn: str) -> str:
    """``text`` with any secret of ``dsn`` (raw, URL-encoded or the whole DSN) masked,
    and then whatever :func:`reconciler.redact.scrub` masks."""
    out = text.replace(dsn, redact_dsn(dsn)) if dsn else text
    for secret in secret_forms(dsn):
        for form in {secret, quote(secret, safe="")}:
            out = out.replace(form, MASK)
    return redact.scrub(out)


def _split_url(rest: str) -> tuple[str, str, str]:
    """authority, path, query of a URL without its scheme (fragment ignored).

    The user info is taken up to the last '@' before the query, so that a password
    someone forgot to percent-encode ('/', '@', '#') is still treated as a password.
    """

    def first(chars: str, start: int) -> int:
        found = [i for i in (rest.find(c, start) for c in chars) if i != -1]
        return min(found, default=len(rest))

    at = rest.rfind("@", 0, first("?", 0))
    end = first("/?" if at != -1 else "/?#", at + 1)
    authority, tail = rest[:end], rest[end:]
    tail = tail.split("#", 1)[0]
    path, _, query = tail.partition("?")
    return authority, path, query


def _redact_url_rest(rest: str) -> str:
    authority, path, query = _split_url(rest)
    # the last '@' ends the user info: an unencoded '@' in a password stays masked
    userinfo, at, hosts = authority.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":" + MASK
    authority = f"{userinfo}@{hosts}" if at else hosts
    if query:
        parts = []
        for item in query.split("&"):
            key, eq, _value = item.partition("=")
            parts.append(f"{key}={MASK}" if eq and unquote(key) in SECRET_KEYS else item)
        query = "?" + "&".join(parts)
    return authority + path + query


def _parse_keyword_value(dsn: str) -> tuple[list[tuple[str, str]], bool]:
    """libpq keyword/value pairs up to the first fault, and whether there was none."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(dsn)
    while True:
        while i < n and dsn[i].isspace():
            i += 1
        if i >= n:
            return pairs, True
        m = _KV_TOKEN_RE.match(dsn, i)
        if not m:
            return pairs, False
        key, i = m.group("key"), m.end()
        value: list[str] = []
        if i < n and dsn[i] == "'":
            i += 1
            while True:
                if i >= n:
                    return pairs, False  # unterminated quote
                c = dsn[i]
                if c == "\\" and i + 1 < n:
                    value.append(dsn[i + 1])
                    i += 2
                elif c == "'":
                    i += 1
                    break
                else:
                    value.append(c)
                    i += 1
        else:
            while i < n and not dsn[i].isspace():
                if dsn[i] == "\\" and i + 1 < n:
                    value.append(dsn[i + 1])
                    i += 2
                else:
                    value.append(dsn[i])
                    i += 1
        pairs.append((key, "".join(value)))


def _redact_keyword_value(dsn: str) -> str:
    pairs, complete = _parse_keyword_value(dsn)
    shown = [f"{k}={MASK if k in SECRET_KEYS else _quote_value(v)}" for k, v in pairs]
    if not complete:
        shown.append(MASK)
    return " ".join(shown)


def _quote_value(value: str) -> str:
    if value and not any(c.isspace() or c in "'\\" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
