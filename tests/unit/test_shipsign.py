"""Signed shipped runs: the controller's key signs, a worker verifies with the keys it trusts."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

cryptography = pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from pytest_celery_dispatch.shipsign import (  # noqa: E402
    DEFAULT_MAX_AGE,
    MAX_CLOCK_AHEAD,
    SignatureError,
    Signer,
    age_refusal,
    parse_age,
    signer_from,
    verify,
)

NOW = 1_790_000_000.0  # the fake clock: when the controller signs, and the worker checks

PAYLOAD = {
    "run_id": "r1",
    "queue": "bench_a",
    "nodeids": ["tests/test_x.py::test_a"],
    "timeout": 300.0,
    "pytest_args": [],
    "plugin_options": {},
    "session_id": "r1.s1",
    "ship": {"mode": "auto", "digest": "d" * 64, "manifest_size": 2},
}


def pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_public(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signed(tmp_path: Path, key, payload=PAYLOAD) -> dict:
    path = tmp_path / "key.pem"
    path.write_bytes(pem_private(key))
    return {**payload, "ship": Signer(str(path), "test", lambda: NOW)(payload)}


@pytest.mark.parametrize(
    "make",
    [
        ed25519.Ed25519PrivateKey.generate,
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
    ids=["ed25519", "ec", "rsa"],
)
def test_a_signed_payload_verifies_with_the_trusted_key(tmp_path: Path, make) -> None:
    key = make()
    (tmp_path / "trust.pem").write_bytes(pem_public(key))
    payload = signed(tmp_path, key)
    assert verify(payload, {"DISPATCH_SHIP_TRUST": str(tmp_path / "trust.pem")}, NOW) is None


def test_a_changed_payload_does_not_verify(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "trust.pem").write_bytes(pem_public(key))
    env = {"DISPATCH_SHIP_TRUST": str(tmp_path / "trust.pem")}
    payload = signed(tmp_path, key)
    for changed in (
        {**payload, "nodeids": ["tests/test_x.py::test_other"]},
        {**payload, "ship": {**payload["ship"], "digest": "e" * 64}},
        {**payload, "ship": {**payload["ship"], "manifest_size": 10**6}},
        {**payload, "pytest_args": ["-o", "pythonpath=/elsewhere"]},
    ):
        assert "does not verify" in str(verify(changed, env, NOW))


def test_a_key_the_worker_does_not_trust_is_refused_naming_the_setting(tmp_path: Path) -> None:
    trusted = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "trust.pem").write_bytes(pem_public(trusted))
    payload = signed(tmp_path, ed25519.Ed25519PrivateKey.generate())
    why = verify(payload, {"DISPATCH_SHIP_TRUST": str(tmp_path / "trust.pem")}, NOW)
    assert "not among the keys it trusts (DISPATCH_SHIP_TRUST)" in str(why)
    assert "set DISPATCH_SHIP_TRUST" in str(verify(payload, {}, NOW))


def test_a_folder_of_certificates_is_a_trust_store(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lab ci")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    store = tmp_path / "store"
    store.mkdir()
    other = ed25519.Ed25519PrivateKey.generate()
    (store / "a.pem").write_bytes(pem_public(other) + cert.public_bytes(serialization.Encoding.PEM))
    payload = signed(tmp_path, key)
    assert verify(payload, {"DISPATCH_SHIP_TRUST": str(store)}, NOW) is None


def test_the_key_comes_from_the_option_or_the_environment_and_is_never_quoted(
    tmp_path: Path,
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    text = pem_private(key).decode()
    assert signer_from(None, {}) is None
    assert signer_from(None, {"CELERY_DISPATCH_SHIP_KEY": text}) is not None
    body = text.splitlines()[1]  # the key material
    with pytest.raises(SignatureError) as info:
        signer_from(None, {"CELERY_DISPATCH_SHIP_KEY": text.replace(body, "!" * len(body))})
    assert "env CELERY_DISPATCH_SHIP_KEY" in str(info.value)
    assert "!!!!" not in str(info.value)
    assert body not in str(info.value)
    with pytest.raises(SignatureError, match="--celery-ship-key"):
        signer_from(str(tmp_path / "missing.pem"), {})
    ship = signer_from(None, {"CELERY_DISPATCH_SHIP_KEY": text})(PAYLOAD)  # type: ignore[misc]
    assert "PRIVATE" not in str(ship)
    assert set(ship["signature"]) == {"key", "value"}


def trusting(tmp_path: Path, key) -> dict[str, str]:
    (tmp_path / "trust.pem").write_bytes(pem_public(key))
    return {"DISPATCH_SHIP_TRUST": str(tmp_path / "trust.pem")}


def test_the_issue_time_is_signed(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    env = trusting(tmp_path, key)
    payload = signed(tmp_path, key)
    assert payload["ship"]["issued"] == NOW
    younger = {**payload, "ship": {**payload["ship"], "issued": NOW + 3600}}
    assert "does not verify" in str(verify(younger, env, NOW + DEFAULT_MAX_AGE + 1))
    other_run = {**payload, "run_id": "r2"}
    assert "does not verify" in str(verify(other_run, env, NOW))


def test_a_signature_older_than_the_workers_maximum_age_is_refused(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    env = trusting(tmp_path, key)
    payload = signed(tmp_path, key)
    assert verify(payload, env, NOW + DEFAULT_MAX_AGE - 1) is None
    why = verify(payload, env, NOW + DEFAULT_MAX_AGE + 1)
    assert "longer ago than this worker takes (DISPATCH_SHIP_MAX_AGE, 1.0 d)" in str(why)
    hour = {**env, "DISPATCH_SHIP_MAX_AGE": "1h"}
    assert verify(payload, hour, NOW + 3599) is None
    assert "made 1.0 h ago" in str(verify(payload, hour, NOW + 3601))


def test_a_signature_dated_ahead_of_the_workers_clock_is_refused(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    env = trusting(tmp_path, key)
    payload = signed(tmp_path, key)
    assert verify(payload, env, NOW - MAX_CLOCK_AHEAD + 1) is None  # clocks a little apart
    assert "ahead of this worker's clock" in str(verify(payload, env, NOW - MAX_CLOCK_AHEAD - 1))


def test_a_bad_maximum_age_or_issue_time_refuses_naming_why() -> None:
    bad = {"DISPATCH_SHIP_MAX_AGE": "soon"}
    assert "invalid duration 'soon' for DISPATCH_SHIP_MAX_AGE" in str(age_refusal(NOW, bad, NOW))
    for issued in (None, "yesterday", True):
        assert "no issue time" in str(age_refusal(issued, {}, NOW))


@pytest.mark.parametrize(
    ("raw", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("12h", 43200), ("2d", 172800)]
)
def test_durations(raw: str, seconds: float) -> None:
    assert parse_age(raw, "x") == seconds


@pytest.mark.parametrize("raw", ["", "0", "-5", "h", "inf", "nan", "1w"])
def test_bad_durations(raw: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_age(raw, "x")
