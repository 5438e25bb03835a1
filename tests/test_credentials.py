"""``tidemark-agent run`` checks its credential bundle in a forked child
(``common.credentials.BundleCheck``) while it goes on starting: the verdict is the one
``process_server.pki.load_bundle`` gives for the same bytes, the credentials are those very
bytes, ``cryptography`` stays out of the agent's own process, and a child that gives no verdict
only costs the check made in the parent."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.deploy import Deployment
from common import credentials
from common.credentials import BundleCheck, Credentials, PkiError, read_bundle
from common.tls import client_context
from process_server.pki import init_pki, issue_credentials, load_bundle

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import asyncio, json, sys
from pathlib import Path
import agent.cli, agent.service, master_target.cli, master_target.service
from common.credentials import BundleCheck
check = BundleCheck.start(Path(sys.argv[1]))
c = asyncio.run(check.credentials())
print(json.dumps([c.name, c.role, "cryptography" in sys.modules]))
"""


@pytest.fixture(autouse=True)
def short_check_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child stuck in a fork made inside pytest fails a test in seconds, not minutes."""
    monkeypatch.setattr(credentials, "CHECK_TIMEOUT", 10.0)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "pki"
    init_pki(d)
    return d


def issue(pki_dir: Path, path: Path, name: str = "web01", role: str = "agent") -> Path:
    issue_credentials(pki_dir, name, path, role=role, force=True)
    return path


def outcome(fn: Callable[[], Credentials]) -> Credentials | str:
    """The credentials ``fn()`` returns, or the message of the PkiError it raises."""
    try:
        return fn()
    except PkiError as exc:
        return str(exc)


def through_child(bundle: Path) -> Credentials:
    """The credentials from a forked check's own verdict (never the in-process fallback)."""
    check = BundleCheck.start(bundle)
    verdict = check.verdict()
    assert verdict is not None, "the child gave no verdict"
    return check.credentials_from(verdict)


def test_the_child_checks_and_the_services_never_import_cryptography(
    pki_dir: Path, tmp_path: Path
) -> None:
    bundle = issue(pki_dir, tmp_path / "web01.bundle", role="master-target")
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(bundle)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == ["web01", "master-target", False]

    creds = through_child(bundle)
    assert creds == load_bundle(bundle)
    assert creds.ca_pem + creds.cert_pem + creds.key_pem == bundle.read_bytes()


def test_bad_bundles_get_the_full_checks_own_message(pki_dir: Path, tmp_path: Path) -> None:
    good = issue(pki_dir, tmp_path / "good.bundle").read_bytes()
    other_pki = tmp_path / "other-pki"
    init_pki(other_pki)
    other = load_bundle(issue(other_pki, tmp_path / "other.bundle"))
    mine = load_bundle(tmp_path / "good.bundle")
    cert_at = good.index(b"-----BEGIN CERTIFICATE-----", 1) + 40
    cases = {
        "key of another certificate": other.ca_pem + other.cert_pem + mine.key_pem,
        "signed by another CA": mine.ca_pem + other.cert_pem + other.key_pem,
        "damaged certificate": good[:cert_at] + b"AAAA" + good[cert_at + 4 :],  # still base64
    }
    for label, data in cases.items():
        bundle = tmp_path / f"{label}.bundle"
        bundle.write_bytes(data)
        os.chmod(bundle, 0o600)
        expected = outcome(functools.partial(load_bundle, bundle))
        assert isinstance(expected, str), label
        assert BundleCheck.start(bundle).verdict() == {"error": expected}, label
        with pytest.raises(PkiError) as caught:
            through_child(bundle)
        assert str(caught.value) == expected, label


def test_the_files_own_checks_fail_at_once_in_the_parent(pki_dir: Path, tmp_path: Path) -> None:
    bundle = issue(pki_dir, tmp_path / "b.bundle")
    os.chmod(bundle, 0o644)
    with pytest.raises(PkiError, match="readable by group or others"):
        BundleCheck.start(bundle)
    os.chmod(bundle, 0o600)
    bundle.write_bytes(bundle.read_bytes() * 2)  # six PEM blocks
    with pytest.raises(PkiError, match="expected PEM blocks"):
        BundleCheck.start(bundle)


def test_blocks_are_what_openssl_loads_crlf_yes_headers_no(pki_dir: Path, tmp_path: Path) -> None:
    bundle = issue(pki_dir, tmp_path / "b.bundle")
    lf = load_bundle(bundle)
    crlf = tmp_path / "crlf.bundle"
    crlf.write_bytes(bundle.read_bytes().replace(b"\n", b"\r\n"))
    os.chmod(crlf, 0o600)
    creds = through_child(crlf)
    assert creds == lf  # the same canonical blocks
    client_context(creds)  # and OpenSSL loads them

    text = bundle.read_bytes()
    headed = tmp_path / "headed.bundle"
    headed.write_bytes(
        text.replace(
            b"-----BEGIN CERTIFICATE-----\n", b"-----BEGIN CERTIFICATE-----\nFoo: bar\n\n", 1
        )
    )
    os.chmod(headed, 0o600)
    with pytest.raises(PkiError, match="not base64 \\(PEM headers are not accepted\\)"):
        BundleCheck.start(headed)


def test_the_bytes_checked_are_the_bytes_used(pki_dir: Path, tmp_path: Path) -> None:
    bundle = issue(pki_dir, tmp_path / "b.bundle")
    first = bundle.read_bytes()
    check = BundleCheck.start(bundle)
    issue(pki_dir, bundle, name="web02")  # rotated while the check runs
    creds = check.credentials_from(check.verdict())
    assert creds.name == "web01"
    assert creds.ca_pem + creds.cert_pem + creds.key_pem == first


def _silent_child(hang: bool = False) -> tuple[int, int]:
    """A child that gives no verdict (exits, or ``hang``s holding its pipe open): (pid, read
    end of its pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            while hang:
                signal.pause()
        finally:
            os._exit(3)
    os.close(w)
    return pid, r


def test_no_verdict_means_the_parent_checks(pki_dir: Path, tmp_path: Path) -> None:
    bundle = issue(pki_dir, tmp_path / "b.bundle")
    blocks = read_bundle(bundle)
    check = BundleCheck(bundle, blocks, _silent_child())
    assert check.verdict() is None
    assert check.credentials_from(None) == load_bundle(bundle)
    assert asyncio.run(BundleCheck(bundle, blocks, _silent_child()).credentials()) == load_bundle(
        bundle
    )

    bad = tmp_path / "bad.bundle"
    bad.write_bytes(blocks.ca + blocks.ca + blocks.key)  # a CA certificate without its key
    os.chmod(bad, 0o600)
    with pytest.raises(PkiError, match="does not match"):
        asyncio.run(BundleCheck(bad, read_bundle(bad), _silent_child()).credentials())


def test_a_child_silent_too_long_is_killed_and_the_parent_checks(
    pki_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = issue(pki_dir, tmp_path / "b.bundle")
    pid, r = _silent_child(hang=True)
    monkeypatch.setattr(credentials, "CHECK_TIMEOUT", 0.2)
    check = BundleCheck(bundle, read_bundle(bundle), (pid, r))
    with caplog.at_level(logging.WARNING, logger="tidemark.credentials"):
        assert check.verdict() is None
    assert "event=credentials_check_silent" in caplog.text
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # killed and reaped
    assert check.credentials_from(None) == load_bundle(bundle)


def test_close_ends_a_check_never_waited_for(pki_dir: Path, tmp_path: Path) -> None:
    bundle = issue(pki_dir, tmp_path / "b.bundle")
    pid, r = _silent_child(hang=True)
    BundleCheck(bundle, read_bundle(bundle), (pid, r)).close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # killed and reaped
    with pytest.raises(OSError):
        os.fstat(r)  # its pipe closed
    check = BundleCheck.start(bundle)
    check.close()
    assert check.verdict() is None  # nothing left to wait for


def test_without_fork_the_check_is_made_in_process(
    pki_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = issue(pki_dir, tmp_path / "b.bundle")

    def no_fork() -> int:
        raise OSError("fork refused")

    monkeypatch.setattr(os, "fork", no_fork)
    with caplog.at_level(logging.WARNING, logger="tidemark.credentials"):
        check = BundleCheck.start(bundle)
    assert "event=credentials_check_inline" in caplog.text
    assert check.verdict() is None
    assert asyncio.run(check.credentials()) == load_bundle(bundle)
    assert asyncio.run(BundleCheck.start(bundle, fork=False).credentials()) == load_bundle(bundle)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_bundle_bytes_get_the_same_outcome_as_the_full_check(
    pki_dir: Path, tmp_path: Path, data: st.DataObject
) -> None:
    """Garbage, and good bundles with bytes flipped, cut or swapped between their blocks."""
    good = tmp_path / "good.bundle"
    if not good.exists():
        issue(pki_dir, good)
    raw = good.read_bytes()
    mutated = data.draw(
        st.binary(max_size=300)
        | st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)).map(
            lambda p: raw[: p[0]] + bytes([p[1]]) + raw[p[0] + 1 :]
        )
        | st.integers(0, len(raw)).map(lambda n: raw[:n])
    )
    bundle = tmp_path / "h.bundle"
    bundle.write_bytes(mutated)
    os.chmod(bundle, 0o600)
    expected = outcome(lambda: load_bundle(bundle))
    assert outcome(lambda: through_child(bundle)) == expected


def test_agent_run_refuses_a_bundle_issued_to_another_name(tmp_path: Path) -> None:
    dep = Deployment(tmp_path / "d")
    dep.init_pki()
    try:
        spec = dep.add_agent("a1", {"d1": 4 << 20})
        dep.start_ps()
        dep.start_agent("a1")  # a good bundle: the agent starts and syncs
        out = dep.cli("agent.cli", "wait", "--config", str(spec.config), "--timeout", "60s")
        assert out.returncode == 0, out
        dep.stop_agent("a1")

        issue(dep.pki, dep.root / "a1.bundle", name="a2")
        proc = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(spec.config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1
        assert "was issued to 'a2'" in proc.stderr
    finally:
        dep.stop_all()


def test_mt_run_refuses_an_agent_bundle(pki_dir: Path, tmp_path: Path) -> None:
    bundle = issue(pki_dir, tmp_path / "mt01.bundle", name="mt01", role="agent")
    image = tmp_path / "fb1.img"
    image.write_bytes(b"\0" * 4096)
    config = tmp_path / "mt.toml"
    config.write_text(
        "[master_target]\n"
        'name = "mt01"\n'
        f'state_dir = "{tmp_path / "mt"}"\n'
        'process_server = "127.0.0.1:9"\n'
        f'credentials = "{bundle}"\n'
        f'\n[[disk]]\nid = "fb1"\npath = "{image}"\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "master_target.cli", "run", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc
    assert "is a agent credential; a master target needs one issued with --role" in proc.stderr
