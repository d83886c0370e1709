"""TLS for what leaves loopback: certificates for a stack, and clients that verify them.

The servers terminate TLS themselves (MLflow's uvicorn with --ssl-certfile/--ssl-keyfile, TorchServe
with certificate_file/private_key_file); nothing here speaks TLS but Python's ssl module. What this
module adds is the certificates a team without a PKI needs:

    <dir>/ca.pem, ca.key            a certificate authority made once for the stack (the key never leaves)
    <dir>/server.pem, server.key    the servers' certificate, signed by it, for every name clients use

Teammates trust ca.pem (MLFLOW_TRACKING_SERVER_CERT_PATH for MLflow's client, REQUESTS_CA_BUNDLE or
SSL_CERT_FILE for others); a certificate a user gives instead is used as it is.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving import environment
from serving.secrets import private_dir, write_private

CA_FILE, CA_KEY, CERT_FILE, KEY_FILE = "ca.pem", "ca.key", "server.pem", "server.key"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
# where a client finds the CA to trust, in this order: MLflow's own variable, then the ones requests
# and OpenSSL read
CA_VARIABLES = (environment.TRACKING_CA, "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
VALID_DAYS = 825  # the longest a server certificate may live for browsers and macOS


class TlsError(ValueError):
    """A certificate or key that cannot be used; the message names the file."""


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None = None  # the stack's CA, to hand to teammates; None for a certificate the user gave


def given_files(cert: Path, key: Path, ca: Path | None = None) -> TlsFiles:
    """A user's own certificate and key (and the CA clients trust it by), checked to belong together now
    rather than when a server starts."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"--tls-cert {cert} / --tls-key {key}: not a certificate and its key ({e})") from e
    return TlsFiles(cert=Path(cert), key=Path(key), ca=Path(ca) if ca else None)


def server_tls(mode: str, *, cert: Path | None, key: Path | None, ca: Path | None = None, directory: Path,
               names: list[str]) -> TlsFiles | None:  # fmt: skip
    """What a server presents: with `mode` auto, the stack's certificate for `names` (kept in `directory`);
    with a certificate given, that one; else None (plain HTTP)."""
    if mode == "auto":
        return stack_certificates(directory, names)
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise TlsError("give both --tls-cert and --tls-key")
        return given_files(cert, key, ca)
    return None


def is_loopback(host: str) -> bool:
    """Whether `host` (a name, or an address, IPv6 with or without brackets) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def machine_hosts() -> list[str]:
    """This machine's names and addresses as a client writes them in a URL (IPv6 in brackets)."""
    import psutil

    names = {socket.gethostname(), socket.getfqdn()}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET:
                names.add(address.address)
            elif address.family == socket.AF_INET6 and not address.address.startswith("fe80"):
                names.add(f"[{address.address}]")
    return sorted(name for name in names if name)


def certificate_names(extra: tuple[str, ...] | list[str] = (), *, machine: bool = True) -> list[str]:
    """What a stack's certificate covers: loopback, this machine's names and addresses (`machine`), and
    `extra` (a compose service's name, a DNS alias); without ports and brackets."""
    names = [*LOOPBACK_NAMES, *(machine_hosts() if machine else []), *extra]
    return list(dict.fromkeys(n.strip("[]") for n in names if n))


def _name(text: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        return x509.DNSName(text)


def _write_pem(path: Path, data: bytes, *, secret: bool) -> None:
    if secret:
        write_private(path, data.decode("ascii"))
    else:
        path.write_bytes(data)


def _certificate(*, subject: str, issuer: Any, public_key: Any, signing_key: Any, ca: bool, names: list[str]):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650 if ca else VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )  # fmt: skip
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([_name(n) for n in names]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _server_names(cert_path: Path) -> set[str]:
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


def stack_certificates(directory: Path, names: list[str]) -> TlsFiles:
    """The stack's CA (made once and kept) and a server certificate for `names` (host names and
    addresses), made again when the names it covers change."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    directory = private_dir(directory)
    pem = serialization.Encoding.PEM
    private = {"encoding": pem, "format": serialization.PrivateFormat.PKCS8,
               "encryption_algorithm": serialization.NoEncryption()}  # fmt: skip
    ca_file, ca_key_file = directory / CA_FILE, directory / CA_KEY
    if not (ca_file.is_file() and ca_key_file.is_file()):
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        ca_cert = _certificate(subject="dlops stack CA", issuer=None, public_key=ca_key.public_key(),
                               signing_key=ca_key, ca=True, names=[])  # fmt: skip
        _write_pem(ca_key_file, ca_key.private_bytes(**private), secret=True)
        _write_pem(ca_file, ca_cert.public_bytes(pem), secret=False)
    cert_file, key_file = directory / CERT_FILE, directory / KEY_FILE
    wanted = {str(_name(n).value) for n in names}
    if not (cert_file.is_file() and key_file.is_file() and _server_names(cert_file) == wanted):
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # TorchServe reads RSA keys only
        cert = _certificate(subject=names[0], issuer=ca_cert.subject, public_key=key.public_key(), signing_key=ca_key,
                            ca=False, names=names)  # fmt: skip
        _write_pem(key_file, key.private_bytes(**private), secret=True)
        _write_pem(cert_file, cert.public_bytes(pem) + ca_cert.public_bytes(pem), secret=False)  # with its chain
    return TlsFiles(cert=cert_file, key=key_file, ca=ca_file)


def trusted_ca(cafile: Path | str | None = None) -> str | None:
    """The CA bundle a client verifies servers with: `cafile`, else the first of CA_VARIABLES that is set
    (None: the system's store)."""
    if cafile:
        return str(cafile)
    return next((os.environ[v] for v in CA_VARIABLES if os.environ.get(v)), None)


def client_context(cafile: Path | str | None = None) -> ssl.SSLContext:
    """Verifies the server's certificate and name against `trusted_ca(cafile)`."""
    return ssl.create_default_context(cafile=trusted_ca(cafile))


def urlopen(request: urllib.request.Request | str, *, timeout: float, cafile: Path | str | None = None):
    """urllib's urlopen, verifying an https server against the CA a client trusts (see trusted_ca)."""
    url = request.full_url if isinstance(request, urllib.request.Request) else request
    context = client_context(cafile) if url.startswith("https://") else None
    return urllib.request.urlopen(request, timeout=timeout, context=context)  # noqa: S310 - http(s) URLs only
