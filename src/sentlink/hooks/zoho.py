"""The ``zoho-crm`` hook: file linked mail on the matching Zoho CRM contact or lead.

``message.linked``: for each address the message was linked through, Zoho is searched for a
contact, then a lead, with that address (``GET /crm/v8/{module}/search?email=``; 204 = none)
and the message is associated with the first one found
(``POST /crm/v8/{module}/{id}/actions/associate_email``). No record in Zoho: nothing to do.
Zoho keys associations on ``original_message_id`` (the Message-ID), so an event delivered again
(a retry, a second node) is answered as a duplicate, which counts as done.

``record.created`` (``crm.unmatched: create-lead``): the lead is created in Zoho
(``POST /crm/v8/Leads``) unless Zoho already has a contact or lead with the address; the
``message.linked`` event that follows (the outbox keeps that order per record) associates the
message with it.

Tokens: the OAuth 2.0 refresh-token grant (RFC 6749 section 6) at
``{accounts_url}/oauth/v2/token``; an access token is used until shortly before it expires, and
a 401 gets one fresh token and one more try. Rate limits: 429 is retried at the time Zoho names
(``Retry-After`` or ``X-RATELIMIT-RESET``). Addresses are checked as for the webhook hook.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from sentlink.config.models import HookConfig
from sentlink.errors import HookError
from sentlink.hooks import Event, Result
from sentlink.hooks.http import (
    MAX_RETRY_AFTER,
    HttpAnswer,
    HttpClient,
    RefusedAddress,
    describe_error,
    retry_after_seconds,
)

log = logging.getLogger("sentlink.hooks.zoho")

API = "/crm/v8"
MODULES = ("Contacts", "Leads")  # searched in this order: a converted lead is a contact
# Refresh this long before Zoho's stated expiry, so a token never runs out mid-request.
_TOKEN_MARGIN = 60.0
_MAX_CREATED = 10_000
_MAX_SUBJECT = 250  # maxLength of subject in Zoho's description of associate_email
_DUPLICATE_CODES = frozenset({"DUPLICATE_DATA", "ALREADY_ASSOCIATED"})


@dataclass(frozen=True)
class ZohoCredentials:
    client_id: str
    client_secret: str = field(repr=False)
    refresh_token: str = field(repr=False)


class _Stop(Exception):
    """Ends a delivery early with ``result``."""

    def __init__(self, result: Result) -> None:
        super().__init__(result.reason)
        self.result = result


def read_secret_file(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise HookError(f"cannot read {what} {path}: {describe_error(exc)}") from None
    value = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not value:
        raise HookError(f"{what} {path} is empty")
    return value


def rate_limit_delay(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds until Zoho accepts requests again: ``Retry-After``, else ``X-RATELIMIT-RESET``
    (an epoch time in milliseconds or seconds, or seconds from now)."""
    delay = retry_after_seconds(headers.get("retry-after"), now)
    if delay is not None:
        return delay
    try:
        reset = float(headers.get("x-ratelimit-reset", ""))
    except ValueError:
        return None
    if reset > 1e12:
        reset = reset / 1000.0 - now
    elif reset > 1e9:
        reset -= now
    return min(max(reset, 0.0), float(MAX_RETRY_AFTER))


class _Tokens:
    """Access tokens from the refresh-token grant, kept until shortly before they expire."""

    def __init__(
        self, client: HttpClient, credentials: ZohoCredentials, clock: Callable[[], float]
    ) -> None:
        self._client = client
        self._credentials = credentials
        self._clock = clock
        self._token = ""
        self._expires = 0.0

    def get(self) -> str:
        if self._token and self._clock() < self._expires - _TOKEN_MARGIN:
            return self._token
        return self._refresh()

    def invalidate(self) -> None:
        self._token = ""

    def _refresh(self) -> str:
        form = urlencode(
            {
                "grant_type": "refresh_token",
                "client_id": self._credentials.client_id,
                "client_secret": self._credentials.client_secret,
                "refresh_token": self._credentials.refresh_token,
            }
        ).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        answer = _send(self._client, "POST", "/oauth/v2/token", form, headers, self._clock)
        reply = _json(answer.body)
        token = reply.get("access_token") if answer.status == 200 else None
        if not isinstance(token, str) or not token:
            # Zoho answers a refused grant with {"error": "invalid_client"} (often as 200).
            reason = str(reply.get("error") or f"HTTP {answer.status}")[:100]
            log.error("zoho: OAuth token refresh refused: %s", reason)
            raise _Stop(Result.retry(f"OAuth token refresh refused: {reason}"))
        expires_in = reply.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 3600.0
        self._token, self._expires = token, self._clock() + lifetime
        return token


class ZohoCrmHook:
    def __init__(
        self,
        name: str,
        api_domain: str,
        accounts_url: str,
        credentials: ZohoCredentials,
        timeout: float = 30.0,
        allow_private: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._name = name
        self._api = HttpClient(api_domain, timeout, allow_private)
        self._accounts = HttpClient(accounts_url, timeout, allow_private)
        self._tokens = _Tokens(self._accounts, credentials, clock)
        self._clock = clock
        self._module_ids: dict[str, str] = {}
        # Leads this hook created: Zoho's search index may not show them yet.
        self._created: OrderedDict[str, tuple[str, str]] = OrderedDict()

    @classmethod
    def from_config(cls, config: HookConfig) -> ZohoCrmHook:
        if (
            config.api_domain is None
            or config.accounts_url is None
            or config.client_id_file is None
            or config.client_secret_file is None
            or config.refresh_token_file is None
        ):
            raise HookError(
                "a zoho-crm hook needs api_domain, accounts_url, client_id_file, "
                "client_secret_file and refresh_token_file"
            )
        credentials = ZohoCredentials(
            read_secret_file(config.client_id_file, "client_id_file"),
            read_secret_file(config.client_secret_file, "client_secret_file"),
            read_secret_file(config.refresh_token_file, "refresh_token_file"),
        )
        return cls(
            config.name,
            config.api_domain,
            config.accounts_url,
            credentials,
            float(config.timeout),
            config.allow_private,
        )

    @property
    def name(self) -> str:
        return self._name

    def close(self) -> None:
        self._api.close()
        self._accounts.close()

    def deliver(self, event: Event) -> Result:
        data = event.data or _json(event.body).get("data") or {}
        try:
            if event.type == "message.linked":
                return self._message_linked(event, data)
            if event.type == "record.created":
                return self._record_created(data)
        except _Stop as stop:
            return stop.result
        return Result.done()  # an event type this adapter has nothing to do for

    # message.linked

    def _message_linked(self, event: Event, data: Mapping[str, Any]) -> Result:
        targets: dict[tuple[str, str], str] = {}
        emails = dict.fromkeys(str(r.get("email", "")) for r in data.get("records") or [])
        for email in filter(None, emails):
            found = self._find(email)
            if found is not None:
                targets.setdefault(found, email)
        if not targets:
            log.debug(
                "zoho %s: event %s: no Zoho record for %s", self._name, event.id, ", ".join(emails)
            )
            return Result.done()
        for (module, record_id), email in targets.items():
            self._associate(module, record_id, _email_entry(event, data))
            log.info(
                "zoho %s: message_id=%s associated with %s %s (%s)",
                self._name,
                data.get("message_id", ""),
                module,
                record_id,
                email,
            )
        return Result.done()

    def _find(self, email: str) -> tuple[str, str] | None:
        for module in MODULES:
            if module == "Leads" and email in self._created:
                return self._created[email]
            query = urlencode({"email": email, "per_page": 1})
            answer = self._call("GET", f"{API}/{module}/search?{query}", None)
            if answer.status == 204:
                continue
            if answer.status == 400:
                # An address Zoho's search cannot take (INVALID_QUERY): not a reason to hold
                # back the message's other records.
                reason = _failed(f"search {module}", answer).reason
                log.warning("zoho %s: %s (address %s)", self._name, reason, email)
                continue
            if answer.status != 200:
                raise _Stop(_failed(f"search {module}", answer))
            records = _json(answer.body).get("data") or []
            if records and isinstance(records[0], dict) and records[0].get("id"):
                return module, str(records[0]["id"])
        return None

    def _associate(self, module: str, record_id: str, entry: dict[str, Any]) -> None:
        entry["linked_record"] = {
            "module": {"api_name": module, "id": self._module_id(module)},
            "id": record_id,
        }
        body = json.dumps({"Emails": [entry]}, ensure_ascii=False).encode()
        path = f"{API}/{module}/{quote(record_id, safe='')}/actions/associate_email"
        answer = self._call("POST", path, body)
        item = _first(_json(answer.body).get("Emails"))
        if 200 <= answer.status < 300 and item.get("status", "success") == "success":
            return
        if _is_duplicate(item):
            log.debug("zoho %s: %s %s already has this message", self._name, module, record_id)
            return
        raise _Stop(_failed(f"associate_email {module}", answer))

    def _module_id(self, module: str) -> str:
        """Zoho's id of a module (the description of associate_email requires it in
        ``linked_record``), from ``GET /crm/v8/settings/modules``, fetched once."""
        if module not in self._module_ids:
            answer = self._call("GET", f"{API}/settings/modules", None)
            if answer.status != 200:
                raise _Stop(_failed("settings/modules", answer))
            for entry in _json(answer.body).get("modules") or []:
                if isinstance(entry, dict) and entry.get("api_name") and entry.get("id"):
                    self._module_ids[str(entry["api_name"])] = str(entry["id"])
            if module not in self._module_ids:
                raise _Stop(Result.failed(f"Zoho lists no module {module}"))
        return self._module_ids[module]

    # record.created

    def _record_created(self, data: Mapping[str, Any]) -> Result:
        record = data.get("record") or {}
        emails = [str(e) for e in record.get("emails") or [] if e]
        if record.get("kind") != "lead" or not emails:
            return Result.done()
        email = emails[0]
        if self._find(email) is not None:
            return Result.done()  # Zoho knows the address already (or we created it before)
        first, last = _split_name(str(record.get("name") or ""), email)
        lead: dict[str, Any] = {"Last_Name": last, "Email": email}
        if first:
            lead["First_Name"] = first
        body = json.dumps({"data": [lead]}, ensure_ascii=False).encode()
        answer = self._call("POST", f"{API}/Leads", body)
        item = _first(_json(answer.body).get("data"))
        details = _dict(item.get("details"))
        if 200 <= answer.status < 300 and item.get("status") == "success":
            lead_id = str(details.get("id", ""))
            if lead_id:
                self._remember(email, ("Leads", lead_id))
            log.info("zoho %s: lead %s created for %s", self._name, lead_id, email)
            return Result.done()
        if item.get("code") == "DUPLICATE_DATA":
            return Result.done()
        raise _Stop(_failed("create lead", answer))

    def _remember(self, email: str, target: tuple[str, str]) -> None:
        self._created[email] = target
        while len(self._created) > _MAX_CREATED:
            self._created.popitem(last=False)

    # HTTP

    def _call(self, method: str, path: str, body: bytes | None) -> HttpAnswer:
        """One API request with a valid token: 401 -> a fresh token and one more try;
        429, 408 and 5xx -> retry (at the time Zoho names); network errors -> retry."""
        answer: HttpAnswer | None = None
        for _attempt in range(2):
            headers = {
                "Authorization": f"Zoho-oauthtoken {self._tokens.get()}",
                "Accept": "application/json",
            }
            if body is not None:
                headers["Content-Type"] = "application/json"
            answer = _send(self._api, method, path, body, headers, self._clock)
            if answer.status != 401:
                break
            self._tokens.invalidate()
        assert answer is not None
        if answer.status == 401:
            log.error("zoho %s: API refuses a fresh token (scopes?)", self._name)
            raise _Stop(Result.retry("HTTP 401 with a fresh token"))
        if answer.status == 429:
            delay = rate_limit_delay(answer.headers, self._clock())
            raise _Stop(Result.retry("HTTP 429: Zoho rate limit", delay))
        if answer.status == 408 or answer.status >= 500:
            delay = retry_after_seconds(answer.headers.get("retry-after"), self._clock())
            raise _Stop(Result.retry(f"HTTP {answer.status}", delay))
        return answer


def _send(
    client: HttpClient,
    method: str,
    path: str,
    body: bytes | None,
    headers: Mapping[str, str],
    clock: Callable[[], float],
) -> HttpAnswer:
    try:
        return client.request(method, path, body, headers)
    except RefusedAddress as exc:
        raise _Stop(Result.failed(str(exc))) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Stop(Result.retry(describe_error(exc))) from None


def _email_entry(event: Event, data: Mapping[str, Any]) -> dict[str, Any]:
    """One ``Emails`` item of associate_email, from the event (Zoho's field names)."""
    participants = [p for p in data.get("participants") or [] if isinstance(p, dict)]

    def people(role: str) -> list[dict[str, str]]:
        return [
            _person(p.get("email"), p.get("name")) for p in participants if p.get("role") == role
        ]

    sender = data.get("from") or next((p for p in participants if p.get("role") == "from"), {})
    subject = str(data.get("subject") or "").strip() or "(no subject)"
    body = data.get("body")
    entry: dict[str, Any] = {
        "from": _person(sender.get("email"), sender.get("name")),
        "to": people("to"),
        "subject": subject[:_MAX_SUBJECT],
        # Without include_body the text stays on the mail server; Zoho wants some content.
        "content": body if isinstance(body, str) and body else subject,
        "mail_format": "text",
        # Zoho dedupes on this; a message without a Message-ID has the event id (stable).
        "original_message_id": str(data.get("message_id") or event.id),
        "sent": data.get("direction") == "sent",
        "date_time": _date_time(str(data.get("date") or ""), event),
    }
    for role in ("cc", "bcc"):
        if people(role):
            entry[role] = people(role)
    return entry


def _person(email: object, name: object) -> dict[str, str]:
    address = str(email or "")
    return {"user_name": str(name or "") or address.partition("@")[0], "email": address}


def _date_time(value: str, event: Event) -> str:
    """RFC 3339 date-time with seconds and offset, as Zoho takes it: the message's Date, else
    the time the event was written."""
    for candidate in (value, str(_json(event.body).get("timestamp") or "")):
        try:
            when = datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if when.tzinfo is not None:
            return when.replace(microsecond=0).isoformat()
    return datetime.fromtimestamp(time.time()).astimezone().replace(microsecond=0).isoformat()


def _split_name(name: str, email: str) -> tuple[str, str]:
    """(First_Name, Last_Name) of a lead; Zoho requires Last_Name."""
    name = " ".join(name.split())
    if not name or name == email or "@" in name:
        return "", email.partition("@")[0] or email
    first, _sep, last = name.rpartition(" ")
    return first, last


def _is_duplicate(item: Mapping[str, Any]) -> bool:
    """Zoho's answer that the record already has an email with this original_message_id."""
    code = str(item.get("code") or "")
    if code in _DUPLICATE_CODES:
        return True
    details = _dict(item.get("details"))
    message = str(item.get("message") or "").lower()
    return (
        code == "INVALID_DATA"
        and details.get("api_name") == "original_message_id"
        and ("already" in message or "duplicate" in message)
    )


def _failed(what: str, answer: HttpAnswer) -> Result:
    reply = _json(answer.body)
    item = _first(reply.get("Emails") or reply.get("data")) or reply
    code = str(item.get("code") or "")
    message = str(item.get("message") or "")[:150]
    return Result.failed(f"{what}: HTTP {answer.status} {code} {message}".rstrip())


def _first(value: object) -> dict[str, Any]:
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return value[0]
    return {}


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body) if body else {}
    except (ValueError, UnicodeError):
        return {}
    return value if isinstance(value, dict) else {}
