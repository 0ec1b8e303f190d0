"""Bus security files: one secret per identity, password files, ACL files and
TLS material that make both brokers (embedded amqtt, or Mosquitto) enforce the
table of ami.security.bus_acl.  See docs/bus-security.md.

Least privilege at rest: each identity's password lives in its own file,
``bus/identities/<user>.secret`` (0600, folder 0700); a process reads only the
identities it logs in as, and the brokers read only password *hashes*.  Every
file under ``bus/`` is 0600 and every folder 0700.

Whether a data folder runs an authenticated bus is recorded, never guessed:
``bus/`` exists (secured), or provisioning with ``--no-bus-security`` wrote the
``bus-anonymous`` marker (open bus, explicitly); see `bus_mode`.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from ami.security.bus_acl import bus_users, permissions


class _TokenSource(Protocol):
    def token_urlsafe(self, nbytes: int | None = ...) -> str: ...


#: Written by ``ami provision --no-bus-security``: the network's bus is open on purpose.
ANONYMOUS_MARKER = "bus-anonymous"
IDENTITIES_DIR = "identities"
SECRET_SUFFIX = ".secret"

BusMode = Literal["secured", "anonymous", "unprovisioned"]


class BusIdentityMissing(RuntimeError):
    """A secured network's identity file this process needs is not there."""


def bus_mode(data_dir: Path) -> BusMode:
    """How the network in `data_dir` was provisioned: ``secured`` (``bus/``
    exists), ``anonymous`` (the ``--no-bus-security`` marker), else
    ``unprovisioned``.  Secured wins over a stale marker."""
    data_dir = Path(data_dir)
    if (data_dir / "bus").is_dir():
        return "secured"
    if (data_dir / ANONYMOUS_MARKER).exists():
        return "anonymous"
    return "unprovisioned"


def write_anonymous_marker(data_dir: Path) -> Path:
    """Record that this network's bus is open on purpose (``--no-bus-security``)."""
    path = Path(data_dir) / ANONYMOUS_MARKER
    _write(path, "provisioned with --no-bus-security: services connect to the bus anonymously\n", 0o600)
    return path


def identity_path(bus_dir: Path, user: str) -> Path:
    if permissions(user) is None:
        raise ValueError(f"unknown bus identity {user!r}")
    return Path(bus_dir) / IDENTITIES_DIR / f"{user}{SECRET_SUFFIX}"


def read_identity(bus_dir: Path, user: str) -> str:
    """The password of one identity, read from its own file (and only that one)."""
    path = identity_path(bus_dir, user)
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise BusIdentityMissing(
            f"bus identity {user!r} missing: {path} does not exist; this network was provisioned with bus "
            "security, so this process must be given that identity's file (re-run `ami provision` or copy it "
            "from the provisioning host); it will not fall back to an anonymous connection"
        ) from None


def read_all_identities(bus_dir: Path) -> dict[str, str]:
    """Every identity's password: for the provisioning host and tests only, never a service."""
    folder = Path(bus_dir) / IDENTITIES_DIR
    if not folder.is_dir():
        return {}
    return {
        f.name[: -len(SECRET_SUFFIX)]: f.read_text(encoding="ascii").strip()
        for f in sorted(folder.iterdir())
        if f.name.endswith(SECRET_SUFFIX)
    }


@dataclass(frozen=True)
class BusSecurity:
    bus_dir: Path
    identities: Path
    amqtt_passwd: Path
    amqtt_acl: Path
    mosquitto_passwd: Path
    mosquitto_acl: Path
    mosquitto_conf: Path
    ca: Path
    server_cert: Path
    server_key: Path
    #: Only filled by write_bus_security (the provisioning host); `at` reads no secret.
    passwords: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def users(self) -> list[str]:
        return list(self.passwords)

    def password(self, user: str) -> str:
        return self.passwords[user]

    def identity(self, user: str) -> Path:
        return identity_path(self.bus_dir, user)

    @classmethod
    def at(cls, bus_dir: Path) -> BusSecurity:
        """Paths under an existing bus dir; no password is read."""
        bus_dir = Path(bus_dir)
        return cls(
            bus_dir=bus_dir,
            identities=bus_dir / IDENTITIES_DIR,
            amqtt_passwd=bus_dir / "amqtt_passwd",
            amqtt_acl=bus_dir / "amqtt_acl.json",
            mosquitto_passwd=bus_dir / "passwd",
            mosquitto_acl=bus_dir / "acl",
            mosquitto_conf=bus_dir / "mosquitto.conf",
            ca=bus_dir / "ca.pem",
            server_cert=bus_dir / "server.pem",
            server_key=bus_dir / "server.key",
        )


def _write(path: Path, data: str | bytes, mode: int) -> None:
    """Write via a temp file and rename, with the mode set before any byte lands."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is ignored if tmp already existed
        os.write(fd, data.encode() if isinstance(data, str) else data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_bus_security(
    out_dir: Path,
    concentrators: list[str],
    *,
    rng: _TokenSource = secrets,
    mqtt_port: int = 1883,
    tls_port: int = 8883,
    server_names: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
) -> BusSecurity:
    """Generate identity secrets, password hashes, ACLs and TLS material under `out_dir/bus/`.

    Everything is regenerated: new passwords, a new CA.  The ports only go
    into the Mosquitto config; amqtt takes them from ami.broker's settings.
    """
    bus_dir = Path(out_dir) / "bus"
    bus_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(bus_dir, 0o700)
    # 32 random bytes: a slow password hash adds nothing against brute force,
    # which is why the amqtt hashes below can use cheap Argon2 parameters.
    passwords = {user: rng.token_urlsafe(32) for user in bus_users(concentrators)}
    sec = dataclasses.replace(BusSecurity.at(bus_dir), passwords=passwords)

    # One file per identity, so that a host is handed only its own.
    sec.identities.mkdir(mode=0o700, exist_ok=True)
    os.chmod(sec.identities, 0o700)
    for stale in sec.identities.iterdir():
        if stale.name.endswith(SECRET_SUFFIX) and stale.name[: -len(SECRET_SUFFIX)] not in passwords:
            stale.unlink()
    for user, pw in passwords.items():
        _write(sec.identity(user), pw + "\n", 0o600)
    (bus_dir / "credentials.json").unlink(missing_ok=True)  # the old every-password file
    (Path(out_dir) / ANONYMOUS_MARKER).unlink(missing_ok=True)
    # The brokers get hashes only; every file here is 0600 (nobody else's business).
    _write(sec.amqtt_passwd, _amqtt_passwd(passwords), 0o600)
    _write(sec.amqtt_acl, json.dumps(amqtt_acl_config(passwords), indent=2) + "\n", 0o600)
    _write_mosquitto_passwd(sec.mosquitto_passwd, passwords)
    _write(sec.mosquitto_acl, mosquitto_acl(passwords), 0o600)
    _write_tls(sec, server_names)
    _write(sec.mosquitto_conf, mosquitto_conf(sec, mqtt_port=mqtt_port, tls_port=tls_port), 0o600)
    return sec


# amqtt 0.12.1's FileAuthPlugin verifies argon2 (and deprecated $6$ crypt) hashes
# through pwdlib.  The verify cost is read from each hash, and it runs inline on
# the broker's event loop: argon2-cffi defaults (t=3, m=64 MiB, p=4) take ~100 ms
# per CONNECT, these ~2 ms.
_ARGON2 = {"time_cost": 1, "memory_cost": 8192, "parallelism": 1}


def _amqtt_passwd(passwords: dict[str, str]) -> str:
    from pwdlib.hashers.argon2 import Argon2Hasher  # amqtt's own dependency

    hasher = Argon2Hasher(**_ARGON2)
    return "".join(f"{user}:{hasher.hash(pw)}\n" for user, pw in passwords.items())


def amqtt_acl_config(users: Iterable[str]) -> dict[str, Any]:
    """The table as the Config of amqtt's stock TopicAccessControlListPlugin.

    Exported for people running the stock `amqtt` broker; ami.broker itself
    enforces the table with ami.broker.plugins instead (see docs for why).  In
    plugin-style config that plugin only accepts `acl` (subscribe) and
    `publish_acl`; `subscribe_acl`/`receive_acl` are rejected by its Config.
    """
    publish: dict[str, list[str]] = {}
    subscribe: dict[str, list[str]] = {}
    for user in users:
        perms = permissions(user)
        assert perms is not None, user
        publish[user] = list(perms.publish)
        subscribe[user] = list(perms.subscribe)
    return {"publish_acl": publish, "acl": subscribe}


def mosquitto_acl(users: Iterable[str]) -> str:
    lines = ["# Generated by ami.security.bus_files from the ACL table; do not edit.", ""]
    for user in users:
        perms = permissions(user)
        assert perms is not None, user
        lines.append(f"user {user}")
        lines += [f"topic write {f}" for f in perms.publish]
        lines += [f"topic read {f}" for f in perms.subscribe]
        lines.append("")
    return "\n".join(lines)


def mosquitto_pbkdf2_hash(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """Mosquitto's `$7$` entry: PBKDF2-HMAC-SHA512, as mosquitto_passwd writes it."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"$7${iterations}${b64(salt)}${b64(digest)}"


def _write_mosquitto_passwd(path: Path, passwords: dict[str, str]) -> None:
    # Prefer the real tool so the format always matches the installed broker.
    tool = shutil.which("mosquitto_passwd")
    if tool:
        plain = path.with_name(path.name + ".plain")
        _write(plain, "".join(f"{u}:{pw}\n" for u, pw in passwords.items()), 0o600)
        try:
            subprocess.run([tool, "-U", str(plain)], check=True, capture_output=True, timeout=30)
            os.chmod(plain, 0o600)
            os.replace(plain, path)
            return
        except (subprocess.SubprocessError, OSError):
            plain.unlink(missing_ok=True)  # never leave plaintext behind
    _write(path, "".join(f"{u}:{mosquitto_pbkdf2_hash(pw)}\n" for u, pw in passwords.items()), 0o600)


def mosquitto_conf(sec: BusSecurity, *, mqtt_port: int, tls_port: int, host: str = "127.0.0.1") -> str:
    owner = pwd.getpwuid(os.geteuid()).pw_name
    return f"""\
# Generated by ami.security.bus_files.  Run: mosquitto -c {sec.mosquitto_conf}
# Mosquitto started as root drops to this user before it reads the password
# file; the secrets here are 0600 and owned by whoever generated them.
user {owner}

# Auth and ACL apply to every listener.
per_listener_settings false
allow_anonymous false
password_file {sec.mosquitto_passwd}
acl_file {sec.mosquitto_acl}

# Plain MQTT, loopback only.
listener {mqtt_port} {host}

# MQTT over TLS, server certificate issued by the private CA in ca.pem.
listener {tls_port} {host}
cafile {sec.ca}
certfile {sec.server_cert}
keyfile {sec.server_key}
tls_version tlsv1.2
"""


def _write_tls(sec: BusSecurity, server_names: Sequence[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    start = now - dt.timedelta(minutes=5)  # tolerate small clock skew between hosts

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ami bus CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = []
    for name in server_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    _write(sec.ca, ca_cert.public_bytes(pem), 0o600)
    _write(sec.server_cert, cert.public_bytes(pem), 0o600)
    _write(
        sec.server_key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        0o600,
    )
    # The CA key is not kept: nothing else is ever signed with it, and a key
    # that does not exist cannot leak.  Re-run write_bus_security to rotate.
