"""A local Zoho CRM (accounts server and API) on loopback that checks every request.

Requests to operations that Zoho's published OpenAPI descriptions cover (read from
``../shared/crm/zoho/``, never copied here) are validated against them: path, method, query
parameters (required ones, types, enums, no unknown ones) and the JSON body (required members,
types, enums, lengths, date-time format, no members the description does not list). The fake's
own answers to those operations are validated against the description's responses too, so the
fake cannot drift from what Zoho documents. The operations no description covers (the OAuth
token grant, ``settings/modules``, creating leads) are checked by hand below, following Zoho's
API documentation.

The description's ``pattern`` for e-mail addresses (``[a-z]{7}[@]zoho[.]com``) is a sample
value, not a constraint (it matches no ordinary address), so patterns are not enforced.

Every violation is answered 400 and recorded in ``violations``; tests assert it stays empty.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

OAS_FILES = ("associate_email.json", "module_search.json")
OAS_DIR = Path(__file__).resolve().parents[2] / "shared" / "crm" / "zoho"

_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")


# OpenAPI


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    regex: re.Pattern[str]
    doc: dict[str, Any]
    spec: dict[str, Any]

    def parameters(self) -> list[dict[str, Any]]:
        return [resolve(self.doc, p) for p in self.spec.get("parameters", [])]

    def body_schema(self) -> dict[str, Any] | None:
        body = self.spec.get("requestBody")
        if body is None:
            return None
        return resolve(self.doc, resolve(self.doc, body)["content"]["application/json"]["schema"])

    def response_schema(self, status: int) -> dict[str, Any] | None:
        response = self.spec.get("responses", {}).get(str(status))
        if response is None:
            return None
        content = resolve(self.doc, response).get("content", {})
        return content.get("application/json", {}).get("schema")


def resolve(doc: dict[str, Any], node: Any) -> Any:
    """Follow local ``$ref``s (``#/components/...``)."""
    while isinstance(node, dict) and "$ref" in node:
        ref = str(node["$ref"])
        assert ref.startswith("#/"), f"external $ref {ref} in a request schema"
        node = doc
        for part in ref[2:].split("/"):
            node = node[part]
    return node


class OpenApi:
    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self.operations: list[Operation] = []
        for doc in documents:
            for template, item in doc["paths"].items():
                pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
                for method, spec in item.items():
                    self.operations.append(
                        Operation(method.upper(), template, re.compile(pattern), doc, spec)
                    )

    @classmethod
    def load(cls, directory: Path) -> OpenApi:
        return cls([json.loads((directory / name).read_text()) for name in OAS_FILES])

    def match(self, method: str, path: str) -> tuple[Operation, dict[str, str]] | None:
        for op in self.operations:
            found = op.regex.fullmatch(path)
            if found and op.method == method:
                return op, found.groupdict()
        return None

    def check_request(
        self, op: Operation, path_params: dict[str, str], query: dict[str, list[str]], body: bytes
    ) -> list[str]:
        problems: list[str] = []
        where = f"{op.method} {op.template}"
        known = set()
        for param in op.parameters():
            name, place = param["name"], param["in"]
            if place == "path":
                if param.get("required") and not path_params.get(name):
                    problems.append(f"{where}: path parameter {name} missing")
                continue
            if place != "query":
                continue
            known.add(name)
            values = query.get(name)
            if not values:
                if param.get("required"):
                    problems.append(f"{where}: required query parameter {name} missing")
                continue
            if len(values) > 1:
                problems.append(f"{where}: query parameter {name} repeated")
            value: Any = values[0]
            schema = resolve(op.doc, param.get("schema", {}))
            if schema.get("type") == "integer":
                if not re.fullmatch(r"-?\d+", value):
                    problems.append(f"{where}: query parameter {name}={value!r} not an integer")
                    continue
                value = int(value)
            check_schema(op.doc, schema, value, f"{where}: query {name}", problems)
        for name in query:
            if name not in known:
                problems.append(f"{where}: query parameter {name} not in the description")
        schema = op.body_schema()
        if schema is not None:
            try:
                parsed = json.loads(body)
            except ValueError:
                return [*problems, f"{where}: body is not JSON"]
            check_schema(op.doc, schema, parsed, f"{where}: body", problems, strict=True)
        elif body:
            problems.append(f"{where}: a body where the description has none")
        return problems


def check_schema(
    doc: dict[str, Any],
    schema: Any,
    value: Any,
    where: str,
    problems: list[str],
    strict: bool = False,
) -> None:
    """The JSON Schema subset the descriptions use; ``strict`` also refuses members an object
    schema does not list (a misspelt optional member would otherwise pass unnoticed)."""
    schema = resolve(doc, schema)
    if "oneOf" in schema:
        fits = 0
        for option in schema["oneOf"]:
            sub: list[str] = []
            check_schema(doc, option, value, where, sub, strict)
            fits += not sub
        if fits != 1:
            problems.append(f"{where}: matches {fits} of the oneOf alternatives, not 1")
        return
    kind = schema.get("type")
    if value is None:
        if not schema.get("nullable"):
            problems.append(f"{where}: null")
        return
    if kind is not None and not _is_type(value, kind):
        problems.append(f"{where}: {type(value).__name__} where {kind} is expected")
        return
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{where}: longer than {schema['maxLength']}")
        if schema.get("format") == "date-time" and not _DATE_TIME.fullmatch(value):
            problems.append(f"{where}: {value!r} is not an RFC 3339 date-time")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{where}: required member {name} missing")
        for name, member in value.items():
            if name in properties:
                check_schema(doc, properties[name], member, f"{where}.{name}", problems, strict)
            elif strict and properties:
                problems.append(f"{where}: member {name} not in the description")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            check_schema(doc, schema["items"], item, f"{where}[{i}]", problems, strict)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    types: dict[str, type | tuple[type, ...]] = {
        "string": str,
        "boolean": bool,
        "object": dict,
        "array": list,
    }
    return isinstance(value, types[kind])


# the fake


@dataclass(frozen=True)
class Seen:
    """A request as the fake received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


MODULE_IDS = {"Contacts": "3652397000000002179", "Leads": "3652397000000002175"}


class FakeZoho:
    """Zoho's accounts server and CRM API in one loopback HTTP server.

    ``contacts``/``leads`` map an address to a record id; ``associations`` lists
    ``(module, record id, Emails item)``; ``requests`` every request in order.
    """

    def __init__(
        self,
        openapi: OpenApi,
        client_id: str = "1000.CLIENT",
        client_secret: str = "client-secret",
        refresh_token: str = "1000.refresh",
        token_lifetime: int = 3600,
    ) -> None:
        self.openapi = openapi
        self.credentials = (client_id, client_secret, refresh_token)
        self.token_lifetime = token_lifetime
        self.contacts: dict[str, str] = {}
        self.leads: dict[str, str] = {}
        self.associations: list[tuple[str, str, dict[str, Any]]] = []
        self.requests: list[Seen] = []
        self.violations: list[str] = []
        self.tokens_issued: list[str] = []
        self._valid_tokens: set[str] = set()
        self._throttle: list[dict[str, str]] = []
        self._ids = itertools.count(3652397000001000001)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # set-up and inspection

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def revoke_tokens(self) -> None:
        """Every access token issued so far is answered 401 from now on (expired early)."""
        with self._lock:
            self._valid_tokens.clear()

    def throttle(self, headers: dict[str, str], times: int = 1) -> None:
        """Answer the next ``times`` API requests 429 with these headers."""
        with self._lock:
            self._throttle += [headers] * times

    def api_requests(self, method: str | None = None, suffix: str = "") -> list[Seen]:
        with self._lock:
            seen = list(self.requests)
        return [
            r
            for r in seen
            if r.path.startswith("/crm/")
            and (method is None or r.method == method)
            and r.path.endswith(suffix)
        ]

    def new_id(self) -> str:
        return str(next(self._ids))

    # serving

    def handle(self, seen: Seen) -> Answer:
        with self._lock:
            self.requests.append(seen)
            if seen.path == "/oauth/v2/token":
                return self._token(seen)
            token = seen.headers.get("authorization", "").removeprefix("Zoho-oauthtoken ")
            if token not in self._valid_tokens:
                return Answer(401, _error("INVALID_TOKEN", "invalid oauth token"))
            if self._throttle:
                return Answer(429, _error("TOO_MANY_REQUESTS", "limit"), self._throttle.pop(0))
            matched = self.openapi.match(seen.method, seen.path)
            if matched is not None:
                op, params = matched
                problems = self.openapi.check_request(op, params, seen.query, seen.body)
                if problems:
                    self.violations += problems
                    return Answer(400, _error("INVALID_DATA", "; ".join(problems)))
                answer = self._described(str(op.spec.get("operationId")), params, seen)
                schema = op.response_schema(answer.status)
                if schema is not None and answer.body is not None:
                    own: list[str] = []
                    check_schema(op.doc, schema, answer.body, f"fake's {answer.status}", own)
                    self.violations += own
                return answer
            return self._undescribed(seen)

    def _token(self, seen: Seen) -> Answer:
        # Zoho OAuth: POST /oauth/v2/token, form fields (RFC 6749 section 6).
        if seen.method != "POST":
            self.violations.append(f"{seen.method} /oauth/v2/token")
            return Answer(405)
        if seen.headers.get("content-type") != "application/x-www-form-urlencoded":
            self.violations.append("token request is not a form")
        form = {k: v[0] for k, v in parse_qs(seen.body.decode()).items()}
        if seen.query:
            self.violations.append("token request carries secrets in the URL")
        if form.get("grant_type") != "refresh_token":
            self.violations.append(f"grant_type {form.get('grant_type')!r}")
            return Answer(400, {"error": "unsupported_grant_type"})
        sent = (form.get("client_id"), form.get("client_secret"), form.get("refresh_token"))
        if sent != self.credentials:
            return Answer(200, {"error": "invalid_client"})  # Zoho says so with 200
        token = f"1000.access.{len(self.tokens_issued) + 1}"
        self.tokens_issued.append(token)
        self._valid_tokens.add(token)
        return Answer(
            200,
            {
                "access_token": token,
                "api_domain": "http://127.0.0.1",
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
            },
        )

    def _described(self, operation: str, params: dict[str, str], seen: Seen) -> Answer:
        if operation == "Search module":
            records = {"Contacts": self.contacts, "Leads": self.leads}.get(params["module"])
            if records is None:
                return Answer(400, _search_error("INVALID_MODULE"))
            email = seen.query.get("email", [""])[0].lower()
            if email not in records:
                return Answer(204)
            return Answer(200, {"data": [{"id": records[email], "Email": email}]})
        if operation == "associate":
            module, record_id = params["module"], params["recordId"]
            records = {"Contacts": self.contacts, "Leads": self.leads}.get(module, {})
            if record_id not in records.values():
                return Answer(400, _email_error("INVALID_DATA", "invalid record id", "id"))
            (item,) = seen.json()["Emails"]
            linked = item["linked_record"]
            if linked["module"] != {"api_name": module, "id": MODULE_IDS[module]}:
                self.violations.append(f"linked_record.module {linked['module']}")
            seen_before = {(m, r, a["original_message_id"]) for m, r, a in self.associations}
            if (module, record_id, item["original_message_id"]) in seen_before:
                return Answer(
                    400,
                    _email_error(
                        "INVALID_DATA",
                        "the email is already associated with this record",
                        "original_message_id",
                    ),
                )
            self.associations.append((module, record_id, item))
            success = {
                "code": "SUCCESS",
                "message": "Email associated successfully",
                "status": "success",
                "details": {"message_id": self.new_id()},
            }
            return Answer(201, {"Emails": [success]})
        self.violations.append(f"no fake for the described operation {operation}")
        return Answer(500)

    def _undescribed(self, seen: Seen) -> Answer:
        if seen.method == "GET" and seen.path == "/crm/v8/settings/modules":
            modules = [
                {"api_name": name, "module_name": name, "id": mid}
                for name, mid in MODULE_IDS.items()
            ]
            return Answer(200, {"modules": modules})
        if seen.method == "POST" and seen.path == "/crm/v8/Leads":
            # Insert Records: {"data": [{"Last_Name": ..., ...}]}; Last_Name is mandatory.
            body = seen.json()
            rows = body.get("data") if isinstance(body, dict) else None
            if (
                not isinstance(rows, list)
                or len(rows) != 1
                or not isinstance(rows[0].get("Last_Name"), str)
                or not rows[0]["Last_Name"]
                or not all(isinstance(v, str) for v in rows[0].values())
            ):
                self.violations.append(f"bad lead insert {body!r}")
                return Answer(400, {"data": [{"code": "MANDATORY_NOT_FOUND", "status": "error"}]})
            lead_id = self.new_id()
            self.leads[str(rows[0].get("Email", "")).lower()] = lead_id
            created = {
                "code": "SUCCESS",
                "details": {"id": lead_id},
                "message": "record added",
                "status": "success",
            }
            return Answer(201, {"data": [created]})
        self.violations.append(f"{seen.method} {seen.path}: no such operation")
        return Answer(404, _error("INVALID_URL_PATTERN", "Please check if the URL is correct"))

    def __enter__(self) -> Self:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                parts = urlsplit(self.path)
                seen = Seen(
                    self.command,
                    parts.path,
                    parse_qs(parts.query, keep_blank_values=True),
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                answer = fake.handle(seen)
                data = b"" if answer.body is None else json.dumps(answer.body).encode()
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if data:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-zoho"
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"code": code, "details": {}, "message": message, "status": "error"}


def _email_error(code: str, message: str, api_name: str) -> dict[str, Any]:
    item = {"code": code, "message": message, "status": "error", "details": {"api_name": api_name}}
    return {"Emails": [item]}


def _search_error(code: str) -> dict[str, Any]:
    details = {"resource_path_index": 2}
    return {"status": "error", "code": code, "message": "invalid module", "details": details}
