"""A lab PKI: one CA and per-host certificates, made with the ``openssl`` command line tool.

``LabPki(directory)`` keeps everything in one directory::

    ca.crt, ca.key                  the lab CA ("ftd lab CA"), self-signed
    server-NAME.crt, .key           a broker certificate; its SANs are the given IPs/DNS names
    client-NAME.crt, .key           a host's certificate, CN = NAME (mosquitto's
                                    ``use_identity_as_username`` makes NAME the MQTT user name)

Every call is idempotent: a certificate is kept when it is still valid for what is asked (signed
by this CA, not expiring within a day, same subject and SANs, matching its key) and remade
otherwise, so a CA made again invalidates every certificate it signed.  Files are written under
temporary names and renamed, so an interrupted run never leaves a half-written pair behind.
Keys are EC P-256 (fast to make and to handshake) and readable by their owner only.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ftd.errors import LabError

#: Names end up in a certificate subject (``/CN=NAME``) and in file names: no ``/``, ``=``, ``,``.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_RE = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
CA_NAME = "ftd lab CA"
DEFAULT_DAYS = 30
#: A certificate expiring sooner than this is remade rather than reused.
_RENEW_MARGIN_S = 86400
_OPENSSL_TIMEOUT_S = 30.0

# A private, minimal openssl configuration: the result must not depend on the system's
# openssl.cnf (whose default extensions differ between distributions).
_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = {usage}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
{san}
"""


@dataclass(frozen=True)
class Identity:
    """A certificate and its private key."""

    name: str
    cert: Path
    key: Path


def _check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise LabError(f"bad certificate name {name!r}: must match {NAME_RE.pattern}")


def _san_line(addresses: Sequence[str], dns_names: Sequence[str]) -> str:
    entries = []
    for addr in addresses:
        try:
            entries.append(f"IP:{ipaddress.ip_address(addr)}")
        except ValueError:
            raise LabError(f"bad IP address for a certificate: {addr!r}") from None
    for dns in dns_names:
        if len(dns) > 253 or not _DNS_RE.fullmatch(dns):
            raise LabError(f"bad DNS name for a certificate: {dns!r}")
        entries.append(f"DNS:{dns}")
    return f"subjectAltName = {', '.join(entries)}" if entries else ""


class LabPki:
    """A CA and its certificates in ``directory``; see the module docstring."""

    def __init__(self, directory: Path | str, *, days: int = DEFAULT_DAYS) -> None:
        """A PKI kept in ``directory`` (created on first use), certificates valid ``days``.

        Nothing is made until a method asks for it.  Raises LabError for ``days`` < 2 (a
        certificate must outlive the one-day renewal margin).
        """
        if days < 2:
            raise LabError(f"certificates must be valid at least 2 days, got {days}")
        self.directory = Path(directory)
        self.days = days

    @property
    def ca_file(self) -> Path:
        """The CA certificate clients and brokers verify against (made by ``ca()``)."""
        return self.directory / "ca.crt"

    def ca(self) -> Identity:
        """The lab CA, made when missing, expiring or unreadable.

        Raises LabError when openssl is missing or fails.
        """
        ident = Identity(CA_NAME, self.ca_file, self.directory / "ca.key")
        spec = f"ca\nCN={CA_NAME}\n"
        if self._current(ident, spec, ca=None):
            return ident
        self.directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.directory, prefix=".make-") as tmp:
            work = Path(tmp)
            conf = work / "openssl.cnf"
            conf.write_text(_CONFIG.format(usage="serverAuth", san=""))
            key, cert = work / "key", work / "crt"
            self._genkey(key)
            self._openssl(
                "req", "-config", str(conf), "-x509", "-new", "-key", str(key),
                "-subj", f"/CN={CA_NAME}", "-days", str(self.days), "-sha256",
                "-extensions", "ca", "-set_serial", _serial(), "-out", str(cert),
            )  # fmt: skip
            self._install(ident, key, cert, spec)
        return ident

    def server(
        self, name: str, addresses: Sequence[str] = (), dns_names: Sequence[str] = ()
    ) -> Identity:
        """A broker certificate ``server-NAME`` whose SANs are ``addresses`` and ``dns_names``.

        Clients check the broker's address against these SANs, so give the address they
        connect to.  Raises LabError for a bad name, address or DNS name, none of them given,
        or an openssl failure.
        """
        _check_name(name)
        if not addresses and not dns_names:
            raise LabError(f"server certificate {name!r} needs at least one IP or DNS name")
        san = _san_line(addresses, dns_names)
        return self._leaf(f"server-{name}", name, "serverAuth", san)

    def client(self, name: str) -> Identity:
        """A client certificate ``client-NAME`` with CN = ``name`` (the host's MQTT identity).

        Raises LabError for a bad name or an openssl failure.
        """
        _check_name(name)
        return self._leaf(f"client-{name}", name, "clientAuth", "")

    def _leaf(self, stem: str, cn: str, usage: str, san: str) -> Identity:
        ca = self.ca()
        ident = Identity(cn, self.directory / f"{stem}.crt", self.directory / f"{stem}.key")
        spec = f"leaf\nCN={cn}\n{usage}\n{san}\n"
        if self._current(ident, spec, ca=ca):
            return ident
        with tempfile.TemporaryDirectory(dir=self.directory, prefix=".make-") as tmp:
            work = Path(tmp)
            conf = work / "openssl.cnf"
            conf.write_text(_CONFIG.format(usage=usage, san=san))
            key, csr, cert = work / "key", work / "csr", work / "crt"
            self._genkey(key)
            self._openssl(
                "req", "-config", str(conf), "-new", "-key", str(key), "-subj", f"/CN={cn}",
                "-out", str(csr),
            )  # fmt: skip
            self._openssl(
                "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
                "-set_serial", _serial(), "-days", str(self.days), "-sha256",
                "-extfile", str(conf), "-extensions", "leaf", "-out", str(cert),
            )  # fmt: skip
            self._install(ident, key, cert, spec)
        return ident

    def _spec_path(self, ident: Identity) -> Path:
        return ident.cert.with_suffix(".spec")

    def _current(self, ident: Identity, spec: str, *, ca: Identity | None) -> bool:
        """Whether ``ident``'s files exist and are still good for ``spec``."""
        try:
            if self._spec_path(ident).read_text() != spec:
                return False
        except OSError:
            return False
        if not (ident.cert.is_file() and ident.key.is_file()):
            return False
        try:
            self._openssl(
                "x509", "-in", str(ident.cert), "-noout", "-checkend", str(_RENEW_MARGIN_S)
            )
            cert_pub = self._openssl("x509", "-in", str(ident.cert), "-noout", "-pubkey")
            key_pub = self._openssl("pkey", "-in", str(ident.key), "-pubout")
            if ca is not None:
                self._openssl("verify", "-CAfile", str(ca.cert), str(ident.cert))
        except LabError:
            return False
        return cert_pub == key_pub

    def _genkey(self, path: Path) -> None:
        self._openssl(
            "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", str(path),
        )  # fmt: skip
        path.chmod(0o600)

    def _install(self, ident: Identity, key: Path, cert: Path, spec: str) -> None:
        # The spec goes last: a crash in between leaves no spec matching the new pair, so the
        # next call remakes it rather than trusting a mixed one.
        self._spec_path(ident).unlink(missing_ok=True)
        os.replace(key, ident.key)
        cert.chmod(0o644)
        os.replace(cert, ident.cert)
        self._spec_path(ident).write_text(spec)

    def _openssl(self, *args: str) -> str:
        try:
            r = subprocess.run(
                ["openssl", *args],
                capture_output=True,
                text=True,
                timeout=_OPENSSL_TIMEOUT_S,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError as err:
            raise LabError("openssl is not installed (needed for the lab PKI)") from err
        except subprocess.TimeoutExpired as err:
            raise LabError(f"openssl {args[0]} hung for {_OPENSSL_TIMEOUT_S}s") from err
        if r.returncode != 0:
            raise LabError(f"openssl {args[0]} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        return r.stdout


def _serial() -> str:
    # Random serials: a CA made again never issues a serial twice with the same issuer name.
    return "0x" + secrets.token_hex(15)
