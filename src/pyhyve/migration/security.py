"""Who may migrate: a shared key for mutual authentication, TLS for encryption.

Authentication (always, unless the destination was started with --insecure): the
destination sends a random nonce; the source answers with its own nonce and
HMAC(key, "pyhyve-src" | nonce_d | nonce_s); the destination proves itself the same way
with the roles swapped. Neither side sends anything of the guest before both proofs check.
Without TLS every later frame carries an HMAC under a session key derived from both
nonces; with TLS (mutual certificates, see `pyhyve migration-certs`) the channel is also
encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import ssl
import subprocess

from .. import untrusted
from ..errors import PyhyveError
from .protocol import Channel, PeerError, ProtocolError, T

KEY_ENV = "PYHYVE_MIGRATION_KEY"
MIN_KEY_BYTES = 16


class SecurityError(PyhyveError, ValueError):
    pass


def load_key(key_file: str | None) -> bytes | None:
    """The shared key from --key-file, else $PYHYVE_MIGRATION_KEY, else None."""
    if key_file:
        try:
            raw = untrusted.read_file(key_file, 4096, "key file").strip()
        except untrusted.BadFile as e:
            raise SecurityError(str(e)) from None
    else:
        raw = os.environ.get(KEY_ENV, "").encode().strip()
        if not raw:
            return None
    if len(raw) < MIN_KEY_BYTES:
        raise SecurityError(f"the migration key must be at least {MIN_KEY_BYTES} bytes")
    return hashlib.sha256(b"pyhyve-migration-key" + raw).digest()


def _proof(key: bytes, role: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(key, role + a + b, "sha256").digest()


def _session(key: bytes, nonce_d: bytes, nonce_s: bytes) -> bytes:
    return hmac.new(key, b"pyhyve-session" + nonce_d + nonce_s, "sha256").digest()


def accept_peer(ch: Channel, key: bytes | None, tls: bool) -> None:
    """Destination side of the handshake."""
    nonce_d = secrets.token_bytes(32)
    ch.send_json(T.CHALLENGE, {"auth": "key" if key else "none", "nonce": nonce_d.hex()})
    if key is None:
        return
    msg = ch.recv(T.AUTH).json(max_depth=1)  # unauthenticated: flat and small only
    try:
        nonce_s = bytes.fromhex(msg["nonce"])
        proof = bytes.fromhex(msg["proof"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("malformed AUTH frame") from None
    if len(nonce_s) != 32 or not hmac.compare_digest(proof, _proof(key, b"pyhyve-src",
                                                                   nonce_d, nonce_s)):
        ch.send_json(T.ERROR, {"reason": "authentication failed: wrong migration key"})
        raise SecurityError("a peer failed authentication (wrong migration key)")
    ch.send_json(T.AUTH_OK, {"proof": _proof(key, b"pyhyve-dst", nonce_s, nonce_d).hex()})
    if not tls:
        ch.enable_mac(_session(key, nonce_d, nonce_s))


def authenticate(ch: Channel, key: bytes | None, tls: bool, allow_insecure: bool) -> None:
    """Source side of the handshake."""
    msg = ch.recv(T.CHALLENGE).json(max_depth=1)
    mode = msg.get("auth")
    if mode == "none":
        if not allow_insecure:
            raise SecurityError("the destination does not authenticate (started with "
                                "--insecure); pass --insecure to migrate anyway")
        return
    if mode != "key":
        raise ProtocolError("malformed CHALLENGE frame")
    if key is None:
        raise SecurityError(f"the destination requires a migration key ({KEY_ENV} or --key-file)")
    try:
        nonce_d = bytes.fromhex(msg["nonce"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("malformed CHALLENGE frame") from None
    nonce_s = secrets.token_bytes(32)
    ch.send_json(T.AUTH, {"nonce": nonce_s.hex(),
                          "proof": _proof(key, b"pyhyve-src", nonce_d, nonce_s).hex()})
    try:
        reply = ch.recv(T.AUTH_OK).json(max_depth=1)
    except PeerError as e:
        raise SecurityError(f"destination refused: {e}") from None
    try:
        proof = bytes.fromhex(reply["proof"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("malformed AUTH_OK frame") from None
    if not hmac.compare_digest(proof, _proof(key, b"pyhyve-dst", nonce_s, nonce_d)):
        raise SecurityError("the destination failed authentication (wrong migration key)")
    if not tls:
        ch.enable_mac(_session(key, nonce_d, nonce_s))


# --- TLS ---------------------------------------------------------------------------------

def tls_files(tls_dir: str) -> tuple[str, str]:
    cert, key = os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem")
    for p in (cert, key):
        if not os.path.exists(p):
            raise SecurityError(f"{p} is missing (create it with: pyhyve migration-certs {tls_dir})")
    return cert, key


def tls_context(tls_dir: str, server: bool) -> ssl.SSLContext:
    """Mutual TLS 1.3; each side trusts exactly the certificate in tls_dir (pinned)."""
    cert, key = tls_files(tls_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False  # peers are identified by the pinned certificate
    return ctx


def make_certs(directory: str) -> tuple[str, str]:
    """A self-signed P-256 certificate and key for a pair (or fleet) of migration hosts."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    for p in (cert, key):
        if os.path.lexists(p):
            raise SecurityError(f"{p} exists; refusing to overwrite it (remove it first, and "
                                "copy the new pair to every host)")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise SecurityError(f"cannot create {directory}: {e.strerror}") from None
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650", "-subj",
                        "/CN=pyhyve-migration", "-keyout", key, "-out", cert],
                       check=True, capture_output=True)
    except FileNotFoundError:
        raise SecurityError("creating certificates needs the openssl command") from None
    except subprocess.CalledProcessError as e:
        raise SecurityError(f"openssl failed: {e.stderr.decode(errors='replace').strip()}") from None
    os.chmod(key, 0o600)
    return cert, key
