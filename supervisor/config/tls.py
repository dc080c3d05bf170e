"""TLS certificates of a program: checked before a generation starts, described for `status`.

supervisord does not terminate TLS itself: it hands certificate and key paths to its workers
(SUPERVISOR_TLS_CERT/SUPERVISOR_TLS_KEY and the {tls.cert}/{tls.key} placeholders), which load them
when they start. Rotation is therefore a reload, and this module makes sure a reload never starts a
generation on files that cannot work: unreadable, not PEM, a key that does not match, expired.

The paths handed over are those of a private copy per generation, written from the very bytes that
were checked (`Bundle.install`): a worker restarted later in the generation (crash, scale, recycle)
presents the generation's certificate, as nginx workers keep the one read at the last reload, never
a file replaced on disk since then and never checked.

`cryptography` is imported by the first check, so only by a master with a `tls:` program: it is
about 9 MiB of the master's resident memory (bench: "master RSS").
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from supervisor.config import files
from supervisor.errors import PreflightError

if TYPE_CHECKING:
    from cryptography import x509


class TlsError(PreflightError):
    """The certificate or key cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class Certificate:
    """What a person wants to know about the certificate a program serves."""

    subject: str
    sans: tuple[str, ...]
    not_after: datetime.datetime
    fingerprint: str  # SHA-256 of the leaf, hex
    chain: int  # certificates in the file, leaf included

    def days_left(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.UTC)
        return (self.not_after - now).total_seconds() / 86400

    def as_dict(self) -> dict[str, object]:
        return {"subject": self.subject, "sans": list(self.sans), "not_after": self.not_after.isoformat(),
                "days_left": round(self.days_left(), 1), "sha256": self.fingerprint, "chain": self.chain}


@dataclass(frozen=True)
class Bundle:
    """The certificate file and key file of a program, as read and checked: what its workers get."""

    certificate: Certificate
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)

    def install(self, folder: str, owner: tuple[int, int] | None = None) -> tuple[str, str]:
        """Write the checked bytes to `folder` (created); return the cert and key paths.

        `owner` (uid, gid): the account the workers run as, which must read them (the key is 0400 and
        theirs). The folder stays the master's: 0711 lets them reach the files, not replace them.
        """
        os.mkdir(folder, 0o700 if owner is None else 0o711)
        paths = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        try:
            for path, data, mode in ((paths[0], self.cert_pem, 0o444), (paths[1], self.key_pem, 0o400)):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode), "wb") as f:
                    if owner is not None:
                        os.fchown(f.fileno(), *owner)
                    f.write(data)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return paths


def load(cert_path: str, key_path: str, now: datetime.datetime | None = None) -> Bundle:
    """Read the certificate and key files once; raise TlsError if they cannot work."""
    cert_pem, key_pem = _read(cert_path), _read(key_path)
    return Bundle(inspect(cert_path, key_path, now, cert_pem, key_pem), cert_pem, key_pem)


def inspect(cert_path: str, key_path: str, now: datetime.datetime | None = None,
            cert_pem: bytes | None = None, key_pem: bytes | None = None) -> Certificate:
    """Load the PEM certificate (chain allowed, leaf first) and key; raise TlsError if unusable.

    `cert_pem`/`key_pem`: the files' contents when already read (the paths then only name them).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    now = now or datetime.datetime.now(datetime.UTC)
    try:
        chain = x509.load_pem_x509_certificates(_read(cert_path) if cert_pem is None else cert_pem)
    except ValueError as exc:
        raise TlsError(f"{cert_path}: not a PEM certificate ({exc})") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(_read(key_path) if key_pem is None else key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TlsError(f"{key_path}: the key does not match the certificate {cert_path}")
    if leaf.not_valid_after_utc <= now:
        raise TlsError(f"{cert_path}: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc > now:
        raise TlsError(f"{cert_path}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return Certificate(subject=_subject(leaf), sans=_sans(leaf), not_after=leaf.not_valid_after_utc,
                       fingerprint=leaf.fingerprint(hashes.SHA256()).hex(), chain=len(chain))


def _read(path: str) -> bytes:
    """A certificate or key file, by the rules of every file the master reads (files.py)."""
    try:
        return files.read(path)
    except files.Refused as exc:
        raise TlsError(f"{path}: {exc}") from None


def _subject(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={names[0].value!s}" if names else cert.subject.rfc4514_string()


def _sans(cert: x509.Certificate) -> tuple[str, ...]:
    from cryptography import x509

    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple([*ext.get_values_for_type(x509.DNSName), *map(str, ext.get_values_for_type(x509.IPAddress))])
