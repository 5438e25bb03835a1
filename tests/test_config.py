"""Configuration loading: the DESIGN.md sketch loads; every error names file, key and problem;
garbage only ever raises ConfigError."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import load_agent_config, load_server_config
from common.errors import ConfigError
from common.units import parse_duration, parse_size

PS_SKETCH = """
[server]
listen = "127.0.0.1:7700"
state_dir = "/var/lib/tidemark/ps"
pki_dir = "/etc/tidemark/pki"
"""

AGENT_SKETCH = """
[agent]
name = "web01"
state_dir = "/var/lib/tidemark/agent"
process_server = "127.0.0.1:7700"
credentials = "/etc/tidemark/web01.bundle"

[[disk]]
id = "web01-root"
path = "/var/lib/images/web01.img"
nbd = "unix:/run/tidemark/web01-root.sock"
"""


def _write(tmp: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def test_design_sketches_load(tmp_path: Path) -> None:
    ps = load_server_config(_write(tmp_path, PS_SKETCH, "ps.toml"))
    assert ps.listen.port == 7700 and ps.state_dir == Path("/var/lib/tidemark/ps")
    agent = load_agent_config(_write(tmp_path, AGENT_SKETCH, "agent.toml"))
    assert agent.name == "web01" and agent.disks[0].id == "web01-root"
    assert agent.disks[0].nbd == "unix:/run/tidemark/web01-root.sock"
    assert (agent.compression_level, agent.compression_fast_level) == (1, -20)
    fixed = AGENT_SKETCH.replace(
        "[agent]\n", "[agent]\ncompression_level = 0\ncompression_fast_level = 3\n"
    )  # compression off: the fast level has nothing to be at most
    assert load_agent_config(_write(tmp_path, fixed, "off.toml")).compression_level == 0


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        (AGENT_SKETCH.replace('name = "web01"', 'name = "bad name"'), "agent.name", "must match"),
        (AGENT_SKETCH.replace('id = "web01-root"', 'id = "../etc"'), "disk[0].id", "disk id"),
        (
            AGENT_SKETCH.replace('"127.0.0.1:7700"', '"nowhere"'),
            "agent.process_server",
            "HOST:PORT",
        ),
        (AGENT_SKETCH.replace('nbd = "unix:', 'nbd = "udp:'), "disk[0].nbd", "expected"),
        (AGENT_SKETCH + 'journal_quota = "lots"\n', "disk[0].journal_quota", "unknown key"),
        (
            AGENT_SKETCH.replace("[agent]\n", '[agent]\njournal_quota = "lots"\n'),
            "agent.journal_quota",
            "not a size",
        ),
        (
            AGENT_SKETCH.replace("[agent]\n", "[agent]\nwindow_batches = 0\n"),
            "agent.window_batches",
            "between",
        ),
        (AGENT_SKETCH.replace("[agent]\n", "[agent]\ntypo = 1\n"), "agent.typo", "unknown key"),
        (
            AGENT_SKETCH.replace("[agent]\n", "[agent]\ncompression_fast_level = 3\n"),
            "agent.compression_fast_level",
            "at most agent.compression_level (1)",
        ),
        (
            AGENT_SKETCH.replace("[agent]\n", "[agent]\ncompression_fast_level = 0\n"),
            "agent.compression_fast_level",
            "must not be 0",
        ),
        (
            AGENT_SKETCH.replace("[agent]\n", "[agent]\ncompression_fast_level = -101\n"),
            "agent.compression_fast_level",
            "between",
        ),
        (
            AGENT_SKETCH.replace('credentials = "/etc/tidemark/web01.bundle"\n', ""),
            "agent.credentials",
            "missing",
        ),
    ],
)
def test_errors_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_agent_config(path)
    message = str(e.value)
    assert str(path) in message and key in message and problem in message


def test_duplicate_disk_ids_and_missing_disks(tmp_path: Path) -> None:
    dup = AGENT_SKETCH + '\n[[disk]]\nid = "web01-root"\npath = "/x.img"\n'
    with pytest.raises(ConfigError, match="duplicate"):
        load_agent_config(_write(tmp_path, dup))
    no_disk = AGENT_SKETCH.split("[[disk]]")[0]
    with pytest.raises(ConfigError, match="at least one"):
        load_agent_config(_write(tmp_path, no_disk))


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_server_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_server_config(_write(tmp_path, "[server\n"))


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_garbage_text_only_raises_config_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.mktemp("g") / "c.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    for loader in (load_agent_config, load_server_config):
        with contextlib.suppress(ConfigError):
            loader(path)


values = st.one_of(
    st.integers(),
    st.text(max_size=20),
    st.booleans(),
    st.floats(allow_nan=False),
    st.lists(st.integers(), max_size=3),
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "name",
                "state_dir",
                "process_server",
                "credentials",
                "journal_quota",
                "window_batches",
                "batch_delay",
                "max_batch_bytes",
            ]
        ),
        values,
    )
)
@settings(max_examples=300, deadline=None)
def test_wrong_value_types_only_raise_config_error(
    tmp_path_factory: pytest.TempPathFactory, agent: dict
) -> None:  # type: ignore[type-arg]
    import json

    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in agent.items())
    path = tmp_path_factory.mktemp("v") / "c.toml"
    path.write_text(f'[agent]\n{lines}\n[[disk]]\nid = "d"\npath = "/x"\n')
    with contextlib.suppress(ConfigError):
        load_agent_config(path)


def test_units() -> None:
    assert (
        parse_size("4GiB") == 4 << 30
        and parse_size("64 MiB") == 64 << 20
        and parse_size(512) == 512
    )
    assert (
        parse_duration("30s") == 30
        and parse_duration("250ms") == 0.25
        and parse_duration("24h") == 86400
    )
    for bad in ("-1", "4 parsecs", "", "1e9"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_socket_paths_longer_than_sun_path_are_refused(tmp_path: Path) -> None:
    deep = "/" + "d" * 120
    with pytest.raises(ConfigError, match=r"server\.state_dir: .* longer than"):
        load_server_config(
            _write(tmp_path, PS_SKETCH.replace('"/var/lib/tidemark/ps"', f'"{deep}"'))
        )
    with pytest.raises(ConfigError, match=r"disk\[0\]\.nbd: .* longer than"):
        load_agent_config(
            _write(tmp_path, AGENT_SKETCH.replace("/run/tidemark/web01-root.sock", deep + ".sock"))
        )
