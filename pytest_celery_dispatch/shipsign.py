"""Who may ship code: a signature over what a slot is asked to run, made with the controller's
key and checked against the keys a worker trusts.

The controller signs each slot's payload (``--celery-ship-key`` / ``CELERY_DISPATCH_SHIP_KEY``:
a PEM private key, Ed25519, EC or RSA, as a file or as the PEM text itself): the run, the queue,
its tests, the options forwarded to pytest and the manifest's digest (the manifest itself is
checked against its digest). A worker runs a shipped tree of a signed run only when the
signature verifies with one of the keys in ``DISPATCH_SHIP_TRUST`` (PEM public keys or
certificates, in a file or a folder of files). The ``cryptography`` package (Celery's own
``celery.security`` uses it) is imported only when a key or a trust store is used.

The key is never logged, reported or sent: only its public key's id (sha256 of its
SubjectPublicKeyInfo, 16 hex digits) travels with the signature.

PYTEST_DONT_REWRITE: the worker side imports it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from .names import ENV_SHIP_KEY, ENV_SHIP_TRUST

#: The payload fields a signature covers (the manifest through ``ship.digest``).
SIGNED_FIELDS = ("run_id", "queue", "nodeids", "timeout", "pytest_args", "plugin_options")

_PEM = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.S)

MISSING_CRYPTOGRAPHY = (
    "signing shipped runs needs the cryptography package: pip install "
    "'pytest-celery-dispatch[sign]'"
)


class SignatureError(Exception):
    """A key that cannot be loaded, or a signature that does not verify."""


def signed_bytes(payload: Mapping[str, Any]) -> bytes:
    ship = payload.get("ship") or {}
    content = {name: payload.get(name) for name in SIGNED_FIELDS}
    content["ship"] = {"mode": ship.get("mode"), "digest": ship.get("digest")}
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise SignatureError(MISSING_CRYPTOGRAPHY) from None
    return serialization


def key_id(public_key: Any) -> str:
    serialization = _crypto()
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def _sign(key: Any, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
        return key.sign(data, pss, hashes.SHA256())
    raise SignatureError(f"unsupported key type {type(key).__name__}: use Ed25519, EC or RSA")


def _verify(public_key: Any, signature: bytes, data: bytes) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

    if isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        public_key.verify(signature, data)
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, rsa.RSAPublicKey):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
        public_key.verify(signature, data, pss, hashes.SHA256())
    else:
        raise SignatureError(f"unsupported trusted key type {type(public_key).__name__}")


class Signer:
    """The controller's signing key (loaded once per run)."""

    def __init__(self, source: str, where: str) -> None:
        serialization = _crypto()
        text = source.encode() if source.lstrip().startswith("-----BEGIN") else None
        try:
            if text is None:
                with open(os.path.expanduser(source), "rb") as fh:
                    text = fh.read()
            self.key = serialization.load_pem_private_key(text, password=None)
        except (OSError, ValueError, TypeError) as exc:
            # the message names where the key came from, never its text
            raise SignatureError(f"cannot load the signing key from {where}: {exc}") from None
        self.key_id = key_id(self.key.public_key())

    def __call__(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The payload's ``ship`` with its signature."""
        signature = _sign(self.key, signed_bytes(payload))
        ship = dict(payload.get("ship") or {})
        ship["signature"] = {"key": self.key_id, "value": base64.b64encode(signature).decode()}
        return ship


def trusted_keys(env: Mapping[str, str]) -> dict[str, Any]:
    """The public keys in ``DISPATCH_SHIP_TRUST`` (a file or a folder of PEM files holding
    public keys or certificates): key id -> key."""
    where = env.get(ENV_SHIP_TRUST, "").strip()
    if not where:
        return {}
    serialization = _crypto()
    from cryptography import x509

    paths = (
        [os.path.join(where, n) for n in sorted(os.listdir(where))]
        if os.path.isdir(where)
        else [where]
    )
    keys: dict[str, Any] = {}
    for path in paths:
        with open(path, "rb") as fh:
            text = fh.read()
        for match in _PEM.finditer(text):
            if match.group(1) == b"CERTIFICATE":
                public = x509.load_pem_x509_certificate(match.group(0)).public_key()
            else:
                public = serialization.load_pem_public_key(match.group(0))
            keys[key_id(public)] = public
    return keys


def verify(payload: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """None when the payload's signature verifies with a key this worker trusts; else why
    not (naming the setting)."""
    signature = (payload.get("ship") or {}).get("signature") or {}
    try:
        keys = trusted_keys(env)
    except (OSError, ValueError, SignatureError) as exc:
        return f"its trusted keys ({ENV_SHIP_TRUST}) cannot be read: {exc}"
    if not keys:
        return f"it trusts no signing key: set {ENV_SHIP_TRUST} to the lab's public key"
    key = keys.get(str(signature.get("key")))
    if key is None:
        return (
            f"the run is signed by key {str(signature.get('key'))[:16]!r}, which is not among "
            f"the keys it trusts ({ENV_SHIP_TRUST})"
        )
    try:
        _verify(key, base64.b64decode(str(signature.get("value", ""))), signed_bytes(payload))
    except Exception:
        return "the run's signature does not verify: the run was changed after it was signed"
    return None


def signer_from(option: str | None, env: Mapping[str, str]) -> Signer | None:
    """``--celery-ship-key``, else ``CELERY_DISPATCH_SHIP_KEY``; None when neither is set."""
    if option:
        return Signer(option, "--celery-ship-key")
    value = env.get(ENV_SHIP_KEY, "")
    return Signer(value, f"env {ENV_SHIP_KEY}") if value.strip() else None
