# Hypothesis fuzzing of the configuration loader (common/config.py): TOML documents built from
# the documented keys with hostile values (wrong types, out-of-range and extreme numbers, path
# traversal in disk ids, NUL bytes, over-long socket paths, unknown keys and tables, missing
# required keys), and valid documents mutated byte by byte. Rule kept: a document either loads
# into a configuration that satisfies every documented constraint, or raises ConfigError whose
# message names the file; nothing else escapes, and memory stays within a bound computed from
# the file's size (tracemalloc). A short run is in the default suite; `-m slow` runs 100 000
# cases per loader. Two inputs that once escaped as other exceptions (a size with hundreds of
# digits, an integer past int's digit limit) are pinned below as regression tests.
"""Fuzzing the TOML configuration loader, with memory bounds."""

from __future__ import annotations

import os
import re
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from common.config import AgentConfig, ServerConfig, load_agent_config, load_server_config
from common.errors import ConfigError

SHORT = int(os.environ.get("TIDEMARK_FUZZ_EXAMPLES", "500"))
LONG = int(os.environ.get("TIDEMARK_FUZZ_LONG_EXAMPLES", "100000"))
DISK_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


CHUNK = 10_000  # long runs go in chunks with their own seeds: Hypothesis's memory stays flat


def run_long(strategy: st.SearchStrategy[Any], check: Callable[[Any], None]) -> None:
    """``LONG`` cases of ``strategy`` through ``check``, in chunks of ``CHUNK`` (reproducible:
    each chunk has a fixed seed; a failure prints the case and its blob)."""
    for k in range(max(1, -(-LONG // CHUNK))):

        @seed(k)
        @settings(_settings(min(CHUNK, LONG - k * CHUNK)), database=None)
        @given(strategy)
        def chunk(case: Any) -> None:
            check(case)

        chunk()


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tidemark-fuzz-config-") as d:
        yield Path(d)


# --------------------------------------------------------------------------- TOML writing


def toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class Raw(str):
    """Text written into the TOML document as is (e.g. an integer too long for int())."""


def toml_value(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
        )
    raise TypeError(value)


def toml_table(header: str, values: dict[str, Any]) -> str:
    return (
        header + "\n" + "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in values.items())
    )


# --------------------------------------------------------------------------- strategies


def texts(**kw: Any) -> st.SearchStrategy[str]:
    """Text without lone surrogates (TOML cannot carry them; that is a parse error)."""
    return st.text(st.characters(exclude_categories=("Cs",)), **kw)


# Extreme magnitudes included: hundreds of digits (float overflow in size parsing) and past
# Python's 4300-digit int limit (the TOML parser's own ValueError).
numbers = st.one_of(
    st.integers(-(2**63), 2**63),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**50, 2**64, 10**39, 10**400, -(10**400)]),
    st.just(Raw("9" * 4400)),  # written as a bare TOML integer
    st.floats(allow_nan=True, allow_infinity=True),
)
units = st.sampled_from(["", "b", "KiB", "MiB", "GiB", "TiB", "k", "ms", "s", "m", "h", "d", "x"])
sizes = st.builds(
    lambda n, u, sp: f"{n}{' ' if sp else ''}{u}",
    st.one_of(
        st.integers(0, 10**12),
        st.floats(0, 1e12, allow_nan=False).map(lambda f: f"{f:.3f}"),
        st.sampled_from(["9" * 320, "9" * 400 + ".5", "1" * 5000]),
    ),
    units,
    st.booleans(),
)
paths = st.one_of(
    st.sampled_from(["/var/lib/x", "rel/dir", "", "/", "a\x00b", "../../etc", "/tmp/" + "p" * 200]),
    texts(max_size=30),
)
disk_ids = st.one_of(
    st.sampled_from(["d", "web01-root", "../etc", "a/b", "..", "a..b", ".hidden", "A", "x" * 65]),
    st.text("abcz09._-/", min_size=0, max_size=70),
)
host_ports = st.one_of(
    st.sampled_from(["127.0.0.1:7700", "[::1]:1", "localhost:0", "h:65536", "h:-1", "h", ":1"]),
    texts(max_size=25),
)
anything = st.recursive(
    st.one_of(st.booleans(), numbers, texts(max_size=20), sizes),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(texts(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)

SERVER_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "listen": host_ports,
    "state_dir": paths,
    "pki_dir": paths,
    "cache_quota": st.one_of(sizes, numbers),
    "cache_segment": st.one_of(sizes, numbers),
    "max_batch_bytes": st.one_of(sizes, numbers),
    "apply_sync_interval": st.one_of(sizes, numbers),
    "heartbeat_timeout": st.one_of(sizes, numbers),
    "verify_on_receive": st.one_of(st.booleans(), numbers),
    "cache_key_file": paths,
}
AGENT_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "name": st.one_of(st.sampled_from(["web01", "a b", "-x", "é"]), texts(max_size=70)),
    "state_dir": paths,
    "process_server": host_ports,
    "credentials": paths,
    "journal_quota": st.one_of(sizes, numbers),
    "journal_segment": st.one_of(sizes, numbers),
    "max_batch_bytes": st.one_of(sizes, numbers),
    "window_batches": numbers,
    "window_bytes": st.one_of(sizes, numbers),
    "batch_delay": st.one_of(sizes, numbers),
    "compression_level": numbers,
    "compression_fast_level": numbers,
    "heartbeat_interval": st.one_of(sizes, numbers),
    "reconnect_min": st.one_of(sizes, numbers),
    "reconnect_max": st.one_of(sizes, numbers),
    "connect_timeout": st.one_of(sizes, numbers),
    "activity_log_extents": numbers,
}
DISK_KEYS: dict[str, st.SearchStrategy[Any]] = {
    "id": disk_ids,
    "path": paths,
    "nbd": st.one_of(
        st.sampled_from(["unix:/run/x.sock", "tcp:127.0.0.1:10809", "unix:", "tcp:x", "udp:1"]),
        st.builds(lambda n: "unix:/" + "s" * n, st.integers(90, 120)),
    ),
    "mode": st.sampled_from(["journal", "scan", "other", ""]),
    "scan_interval": st.one_of(sizes, numbers),
}
SERVER_BASE = {"listen": "127.0.0.1:7700", "state_dir": "/var/lib/ps", "pki_dir": "/etc/pki"}
AGENT_BASE = {
    "name": "web01",
    "state_dir": "/var/lib/agent",
    "process_server": "127.0.0.1:7700",
    "credentials": "/etc/web01.bundle",
}


@st.composite
def section(
    draw: st.DrawFn, base: dict[str, Any], keys: dict[str, st.SearchStrategy[Any]]
) -> dict[str, Any]:
    """``base`` with some keys replaced by hostile values, some removed, some unknown added."""
    values = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(keys)), max_size=4, unique=True)):
        values[key] = draw(st.one_of(keys[key], keys[key], anything))
    if draw(st.integers(0, 7)) == 0:
        values.pop(draw(st.sampled_from(sorted(values))), None)
    if draw(st.integers(0, 9)) == 0:
        values[draw(texts(max_size=12))] = draw(anything)
    return values


@st.composite
def server_docs(draw: st.DrawFn) -> str:
    text = toml_table("[server]", draw(section(SERVER_BASE, SERVER_KEYS)))
    if draw(st.integers(0, 19)) == 0:
        text += toml_table("[extra]", {"x": 1})
    return text


@st.composite
def agent_docs(draw: st.DrawFn) -> str:
    text = toml_table("[agent]", draw(section(AGENT_BASE, AGENT_KEYS)))
    for i in range(draw(st.integers(0, 3))):
        base = {"id": f"disk-{i}", "path": f"/images/{i}.img"}
        text += toml_table("[[disk]]", draw(section(base, DISK_KEYS)))
    return text


@st.composite
def mutated_text(draw: st.DrawFn, docs: st.SearchStrategy[str]) -> bytes:
    data = bytearray(draw(docs).encode("utf-8", errors="surrogatepass"))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "delete", "insert", "dup"]))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from([b"[", b"]", b'"', b"=", b"\n", b"\\", b"\x00"]))
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 40))]
    return bytes(data)


def config_inputs(docs: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    whole = docs.map(lambda t: t.encode("utf-8", errors="surrogatepass"))
    return st.one_of(whole, whole, whole, mutated_text(docs), st.binary(max_size=200))


# --------------------------------------------------------------------------- checks


def _traced_load(path: Path, loader: Any) -> tuple[Any, int]:
    """``(config or None, tracemalloc peak)`` of one load; a ConfigError must name the file."""
    tracemalloc.start()
    try:
        try:
            return loader(path), tracemalloc.get_traced_memory()[1]
        except ConfigError as exc:
            assert str(exc).startswith(str(path)), f"the error does not name the file: {exc}"
            return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _bounded_load(path: Path, data: bytes, loader: Any) -> Any:
    path.write_bytes(data)
    bound = 64 * len(data) + (512 << 10)
    cfg, peak = _traced_load(path, loader)
    if peak > bound:
        # Once in ~10^5 loads the interpreter grows one of its own tables (~2 MiB) inside the
        # window; memory that grows with the input would grow again on the same input.
        cfg, peak = _traced_load(path, loader)
    assert peak <= bound, f"loading {len(data)} bytes peaked at {peak} bytes, twice"
    return cfg


def check_server(workdir: Path, data: bytes) -> None:
    cfg: ServerConfig | None = _bounded_load(workdir / "ps.toml", data, load_server_config)
    if cfg is None:
        return
    assert cfg.listen.host and 0 <= cfg.listen.port <= 65535
    assert cfg.state_dir.is_absolute() and cfg.pki_dir.is_absolute()
    assert 16 << 20 <= cfg.cache_quota <= 1 << 50
    assert 64 << 10 <= cfg.cache_segment <= 1 << 30
    assert 64 << 10 <= cfg.max_batch_bytes <= 32 << 20
    assert 0 <= cfg.apply_sync_interval <= 60 and 1 <= cfg.heartbeat_timeout <= 3600
    assert isinstance(cfg.verify_on_receive, bool)
    assert len(str(cfg.admin_socket).encode()) <= 107
    key_file = getattr(cfg, "cache_key_file", None)
    if key_file is not None:
        assert key_file.is_absolute()
        assert cfg.state_dir.resolve() not in (key_file.resolve(), *key_file.resolve().parents)


def check_agent(workdir: Path, data: bytes) -> None:
    cfg: AgentConfig | None = _bounded_load(workdir / "agent.toml", data, load_agent_config)
    if cfg is None:
        return
    assert NAME.fullmatch(cfg.name)
    assert cfg.state_dir.is_absolute() and cfg.credentials.is_absolute()
    assert cfg.disks, "an agent without disks was accepted"
    ids = [d.id for d in cfg.disks]
    assert len(set(ids)) == len(ids)
    for disk in cfg.disks:
        assert DISK_ID.fullmatch(disk.id) and ".." not in disk.id, disk.id
        assert disk.path.is_absolute() and "\x00" not in str(disk.path)
        assert disk.mode in ("journal", "scan")
        if disk.nbd is not None:
            assert disk.nbd.startswith(("unix:", "tcp:")) and disk.mode == "journal"
            if disk.nbd.startswith("unix:"):
                assert len(disk.nbd[5:].encode()) <= 107
    assert cfg.max_batch_bytes <= cfg.window_bytes
    assert 1 <= cfg.window_batches <= 1024 and -100 <= cfg.compression_level <= 19
    assert -100 <= cfg.compression_fast_level <= 19 and cfg.compression_fast_level != 0
    assert not cfg.compression_level or cfg.compression_fast_level <= cfg.compression_level
    assert len(str(cfg.admin_socket).encode()) <= 107


@_settings(SHORT)
@given(config_inputs(server_docs()))
def test_fuzz_server_config(workdir: Path, data: bytes) -> None:
    check_server(workdir, data)


@_settings(SHORT)
@given(config_inputs(agent_docs()))
def test_fuzz_agent_config(workdir: Path, data: bytes) -> None:
    check_agent(workdir, data)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_server_config_long(workdir: Path) -> None:
    run_long(config_inputs(server_docs()), lambda data: check_server(workdir, data))


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_agent_config_long(workdir: Path) -> None:
    run_long(config_inputs(agent_docs()), lambda data: check_agent(workdir, data))


def test_a_large_config_file_is_read_within_bounds(workdir: Path) -> None:
    """A 1 MiB comment block: memory follows the file's size (no quadratic blow-up)."""
    text = toml_table("[server]", SERVER_BASE) + ("# " + "x" * 1000 + "\n") * 1024
    cfg = _bounded_load(workdir / "big.toml", text.encode(), load_server_config)
    assert cfg is not None


# --------------------------------------------------------------------------- once escaped


def test_a_size_with_hundreds_of_digits_is_a_config_error(workdir: Path) -> None:
    path = workdir / "overflow.toml"
    path.write_text(toml_table("[server]", {**SERVER_BASE, "cache_quota": "9" * 400 + " GiB"}))
    with pytest.raises(ConfigError, match="cache_quota"):
        load_server_config(path)


def test_an_integer_with_5000_digits_is_a_config_error(workdir: Path) -> None:
    path = workdir / "digits.toml"
    path.write_text(toml_table("[server]", SERVER_BASE) + "cache_quota = " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_server_config(path)
