"""amqps:// end to end: controller and worker through a TLS front of the local RabbitMQ.

The certificate is made for "localhost" by a throwaway CA-less self-signed cert; the worker and
the controller trust it through DISPATCH_SSL_CA. Without that trust, or under another host
name, the connection must be refused.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def tls_broker(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, str(HERE / "tls_proxy.py"), str(cert), str(key), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stdout is not None
        assert proxy.stdout.readline().strip() == "ready"
        yield {"port": port, "ca": str(cert)}
    finally:
        proxy.kill()
        proxy.wait(10)


def test_amqps_with_a_verified_certificate(
    pytester, workspace, worker_factory, tls_broker, monkeypatch
):
    url = f"amqps://guest:guest@localhost:{tls_broker['port']}//"
    env = {"DISPATCH_SSL_CA": tls_broker["ca"]}
    worker = worker_factory(worker_id="worker-tls", broker=url, extra_env=env)
    pytester.makepyfile(
        test_tls=f"""
        import os
        import pytest

        @pytest.mark.queue({worker.queue!r})
        def test_over_tls():
            assert os.environ["WORKER_ID"] == "worker-tls"
        """
    )
    common = [
        "--celery-dispatch",
        f"--celery-broker={url}",
        f"--rootdir={workspace}",
        f"--celery-json-report={pytester.path / 'r.json'}",
    ]
    monkeypatch.setenv("DISPATCH_SSL_CA", tls_broker["ca"])
    ok = pytester.runpytest_subprocess(*common, timeout=90)
    ok.assert_outcomes(passed=1)

    # Not trusting the certificate: refused, with the reason.
    monkeypatch.delenv("DISPATCH_SSL_CA")
    untrusted = pytester.runpytest_subprocess(*common, timeout=60)
    untrusted.assert_outcomes(failed=1)
    untrusted.stdout.fnmatch_lines(
        ["*cannot reach the broker amqps://guest:**@localhost*CERTIFICATE_VERIFY_FAILED*"]
    )

    # Trusted certificate, wrong host name: refused too.
    monkeypatch.setenv("DISPATCH_SSL_CA", tls_broker["ca"])
    other_name = [
        a.replace("localhost", "127.0.0.1") if a.startswith("--celery-broker") else a
        for a in common
    ]
    mismatch = pytester.runpytest_subprocess(*other_name, timeout=60)
    mismatch.assert_outcomes(failed=1)
    mismatch.stdout.fnmatch_lines(["*cannot reach the broker amqps://*IP address mismatch*"])
