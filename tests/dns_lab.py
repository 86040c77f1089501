"""A small authoritative DNS server on loopback UDP for tests: TXT records from a dict, and a
switch that makes it stop answering (a resolver then times out)."""

from __future__ import annotations

import base64
import socket
import subprocess
import threading
from pathlib import Path
from types import TracebackType

import dkim
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import nacl.encoding
import nacl.signing


class TxtServer:
    def __init__(self, records: dict[str, str] | None = None) -> None:
        self.records = {k.lower().rstrip("."): v for k, v in (records or {}).items()}
        self.silent = False  # True: drop every query
        self.queries: list[str] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    def __enter__(self) -> TxtServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(wire)
            question = query.question[0]
            name = question.name.to_text().lower().rstrip(".")
            self.queries.append(name)
            if self.silent:
                continue
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            value = self.records.get(name)
            if value is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif question.rdtype == dns.rdatatype.TXT:
                # TXT strings are at most 255 bytes each (RFC 1035 3.3.14): split long keys.
                chunks = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
                response.answer.append(
                    dns.rrset.from_text(question.name, 60, dns.rdataclass.IN, "TXT", chunks)
                )
            self._sock.sendto(response.to_wire(), peer)


def dkim_key(directory: Path) -> tuple[bytes, str]:
    """A fresh 1024-bit RSA key: (private key PEM, the TXT record publishing its public half)."""
    private = directory / "dkim.key"
    subprocess.run(
        ["openssl", "genrsa", "-out", str(private), "1024"], check=True, capture_output=True
    )
    der = subprocess.run(
        ["openssl", "rsa", "-in", str(private), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return private.read_bytes(), "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def dkim_ed25519_key() -> tuple[bytes, str]:
    """A fresh Ed25519 key (RFC 8463): (its base64 seed, as dkimpy signs with it; the TXT
    record publishing its public half)."""
    signing = nacl.signing.SigningKey.generate()
    public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return signing.encode(encoder=nacl.encoding.Base64Encoder), f"v=DKIM1; k=ed25519; p={public}"


def dkim_sign(
    message: bytes,
    domain: str,
    selector: str,
    private_key: bytes,
    algorithm: bytes = b"rsa-sha256",
) -> bytes:
    """``message`` with a DKIM-Signature header prepended (relaxed/simple; rsa-sha256 with a
    PEM key of :func:`dkim_key`, ed25519-sha256 with a key of :func:`dkim_ed25519_key`)."""
    signature: bytes = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        private_key,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        signature_algorithm=algorithm,
    )
    return signature + message
