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
import time
from collections.abc import Callable, Mapping
from typing import Any

from .names import ENV_SHIP_KEY, ENV_SHIP_MAX_AGE, ENV_SHIP_TRUST

#: The payload fields a signature covers (the manifest through ``ship.digest``).
SIGNED_FIELDS = ("run_id", "queue", "nodeids", "timeout", "pytest_args", "plugin_options")
#: ... and those of its ``ship``: ``issued`` is when the controller signed (Unix time).
SIGNED_SHIP_FIELDS = ("mode", "digest", "manifest_size", "issued")
#: A signature older than this is refused (``DISPATCH_SHIP_MAX_AGE``; seconds).
DEFAULT_MAX_AGE = 24 * 3600.0
#: A signature dated further ahead of the worker's clock is refused (seconds).
MAX_CLOCK_AHEAD = 300.0

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
    content["ship"] = {name: ship.get(name) for name in SIGNED_SHIP_FIELDS}
    return json.dumps(content, sort_keys=True, separators=(",", ":")).encode()


def parse_age(raw: str, source: str) -> float:
    """``90``, ``90s``, ``30m``, ``12h`` or ``2d`` as seconds; ValueError naming ``source``."""
    text = str(raw).strip().lower()
    factor = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in ("s", "m", "h", "d") else text
    try:
        value = float(number) * factor
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(
            f"invalid duration {raw!r} for {source}: expected seconds, or a number with s, m, h "
            "or d (e.g. 12h)"
        )
    return value


def max_age(env: Mapping[str, str]) -> float:
    """How old a signature this worker takes (``DISPATCH_SHIP_MAX_AGE``), in seconds."""
    raw = env.get(ENV_SHIP_MAX_AGE, "").strip()
    return parse_age(raw, ENV_SHIP_MAX_AGE) if raw else DEFAULT_MAX_AGE


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.3g} s"


def age_refusal(issued: Any, env: Mapping[str, str], now: float) -> str | None:
    """None when a signature made at ``issued`` (controller's clock, Unix time) is young enough
    for this worker at ``now``; else why not, naming the setting."""
    if type(issued) not in (int, float):
        return "the run's signature has no issue time (sign it with this plugin's version)"
    try:
        limit = max_age(env)
    except ValueError as exc:
        return str(exc)
    age = now - issued
    if age > limit:
        return (
            f"the run's signature was made {_duration(age)} ago, longer ago than this worker "
            f"takes ({ENV_SHIP_MAX_AGE}, {_duration(limit)}): a run sent again, or one that "
            f"waited that long for a free slot. Start the run again (each slot is signed when "
            f"it is sent), or raise {ENV_SHIP_MAX_AGE} in the worker's environment"
        )
    if -age > MAX_CLOCK_AHEAD:
        return (
            f"the run's signature is dated {_duration(-age)} ahead of this worker's clock (more "
            f"than {MAX_CLOCK_AHEAD:.0f} s): set the controller's and the worker's clocks (NTP)"
        )
    return None


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

    def __init__(self, source: str, where: str, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # the issue time signed with each payload
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
        """The payload's ``ship`` with its issue time and its signature."""
        ship = dict(payload.get("ship") or {})
        ship["issued"] = self.clock()
        signature = _sign(self.key, signed_bytes({**payload, "ship": ship}))
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


def verify(payload: Mapping[str, Any], env: Mapping[str, str], now: float) -> str | None:
    """None when the payload's signature verifies with a key this worker trusts and is not
    older than its ``DISPATCH_SHIP_MAX_AGE`` at ``now`` (Unix time); else why not (naming the
    setting)."""
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
    return age_refusal((payload.get("ship") or {}).get("issued"), env, now)


def signer_from(option: str | None, env: Mapping[str, str]) -> Signer | None:
    """``--celery-ship-key``, else ``CELERY_DISPATCH_SHIP_KEY``; None when neither is set."""
    if option:
        return Signer(option, "--celery-ship-key")
    value = env.get(ENV_SHIP_KEY, "")
    return Signer(value, f"env {ENV_SHIP_KEY}") if value.strip() else None
