"""TLS certificates and SuperNode key pairs for a real deployment.

* A CA (self-signed), and a SuperLink server certificate it signs, valid for the names and
  addresses SuperNodes and the `flwr` CLI use to reach it (SubjectAltName: localhost and
  127.0.0.1 by default, or the host given).
* One EC P-384 key pair per SuperNode in OpenSSH format, as Flower's node authentication
  expects: the public half is registered with `flwr supernode register`, the private half
  stays on the node (`--auth-supernode-private-key`).

Private keys are written with mode 0600; nothing is overwritten unless asked.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path: Path, data: bytes, *, private: bool = False, overwrite: bool = False) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mops-fl"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def make_certificates(out: Path, hosts: list[str] | None = None, *, days: int = 365, overwrite: bool = False) -> dict[str, Path]:
    """ca.crt/ca.key and server.pem/server.key for the SuperLink, signed by that CA."""
    hosts = hosts or ["localhost", "127.0.0.1", "::1"]
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mops-fl CA"))
        .issuer_name(_name("mops-fl CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "ca_cert": _write(out / "ca.crt", ca_cert.public_bytes(pem), overwrite=overwrite),
        "ca_key": _write(out / "ca.key", _pem_key(ca_key), private=True, overwrite=overwrite),
        "server_cert": _write(out / "server.pem", server_cert.public_bytes(pem), overwrite=overwrite),
        "server_key": _write(out / "server.key", _pem_key(server_key), private=True, overwrite=overwrite),
    }


def make_supernode_keys(out: Path, names: list[str], *, overwrite: bool = False) -> dict[str, tuple[Path, Path]]:
    """NAME (OpenSSH private key) and NAME.pub (OpenSSH public key, ecdsa-sha2-nistp384) per SuperNode."""
    made = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        made[name] = (
            _write(out / name, private, private=True, overwrite=overwrite),
            _write(out / f"{name}.pub", public + f" {name}\n".encode(), overwrite=overwrite),
        )
    return made
