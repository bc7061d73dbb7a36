"""A self-signed certificate for the STARTTLS tests, made with the openssl CLI
(as an operator would), valid for `localhost` and 127.0.0.1."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path


def self_signed(directory: Path) -> tuple[Path, Path]:
    """Write cert.pem and key.pem (EC P-256, one day) into `directory`."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


def client_context(cert: Path) -> ssl.SSLContext:
    """A client context that trusts only this certificate (and checks the name)."""
    return ssl.create_default_context(cafile=str(cert))
