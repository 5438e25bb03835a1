"""``python -m benchmarks.sync_ab`` (a diagnostic, docs/benchmarks.md): each variant's
services run that variant's code (a marker planted in a revision's exported tree is written
by its services, also when that tree is named by its path, and not by the working tree's), every replica equals its source (checked
here with a digest of both files, outside the code under test), the summary counts what the
runs say, and bad arguments get a clear error."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest

from benchmarks.sync import make_half_holes
from benchmarks.sync_ab import (
    REPO,
    Variant,
    main,
    one_run,
    parse_variant,
    parse_variant_option,
    prepare,
    sign_test,
    summary,
)

MARKER = """
import os as _os
if _os.environ.get("SYNC_AB_MARKER"):
    with open(_os.environ["SYNC_AB_MARKER"], "a") as _f:
        _f.write(str(_os.getpid()) + "\\n")
"""


def _digest(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


@pytest.mark.timeout(300)
def test_each_variant_runs_its_own_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "src.img"
    make_half_holes(image, 32 << 20, seed=3)
    source = _digest(image)
    marker = tmp_path / "marker"
    monkeypatch.setenv("SYNC_AB_MARKER", str(marker))
    revision = Variant("rev", "HEAD", {"compression_level": 3})
    prepare(revision, tmp_path)
    assert revision.tree == tmp_path / "tree-rev" and (revision.tree / "agent" / "cli.py").exists()
    with open(revision.tree / "agent" / "__init__.py", "a") as f:
        f.write(MARKER)  # this tree only: the working tree's agent stays as it is

    run = one_run(revision, tmp_path / "run-0", image)
    assert run["equal"] and run["variant"] == "rev" and run["seconds"] > 0
    assert marker.read_text().split(), "the revision's services did not run its code"
    assert _digest(image) == source  # the source was only read

    marker.unlink()  # the same tree named by its path: used as it is, marker and all
    elsewhere = Variant("dir", str(revision.tree))
    prepare(elsewhere, tmp_path)
    assert elsewhere.tree == revision.tree.resolve()
    assert one_run(elsewhere, tmp_path / "run-1", image)["equal"] and marker.exists()

    marker.unlink()
    here = Variant("here", ".")
    prepare(here, tmp_path)
    assert here.tree == REPO
    run2 = one_run(here, tmp_path / "run-2", image)
    assert run2["equal"] and not marker.exists()
    assert run2["machine_busy"] > 0 and run2["machine_idle"] >= 0


def test_summary_counts_pairs_and_the_sign_test() -> None:
    a, b = Variant("a", "."), Variant("b", ".")
    runs = []
    for i, (ta, tb) in enumerate([(2.0, 1.5), (2.2, 1.9), (1.8, 2.1), (2.5, 2.5), (2.4, 2.0)]):
        for name, seconds in (("a", ta), ("b", tb)):
            runs.append(
                {
                    "variant": name,
                    "pair": i,
                    "seconds": seconds,
                    "agent_cpu": 1.0,
                    "ps_cpu": 2.0,
                    "machine_idle": 0.5,
                }
            )
    out = summary([a, b], runs)
    assert out["a"]["seconds"] == [1.8, 2.0, 2.2, 2.4, 2.5] and out["a"]["median"] == 2.2
    assert (out["b"]["pairs_won"], out["b"]["pairs_lost"]) == (3, 1)  # one tie left out
    assert out["b"]["sign_test_p"] == 0.625 and "against" not in out["a"]
    assert sign_test(5, 0) == 0.0625 and sign_test(0, 5) == 0.0625
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0


@pytest.mark.parametrize("text", ["", "x", "=HEAD", "a=", "1a=HEAD", "a b=HEAD"])
def test_bad_variants_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=REV"):
        parse_variant(text)


def test_bad_options_and_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_variant_option("new:compression_level=3") == ("new", "compression_level", 3)
    with pytest.raises(argparse.ArgumentTypeError, match="NAME:KEY=VALUE"):
        parse_variant_option("compression_level=3")
    for argv in (
        ["--variant", "a=."],  # one variant
        ["--variant", "a=.", "--variant", "a=HEAD"],  # one name twice
        ["--variant", "a=.", "--variant", "b=.", "--option", "c:compression_level=3"],
        ["--variant", "a=.", "--variant", "b=.", "--pairs", "0"],
        ["--variant", "a=.", "--variant", "b=.", "--size-mib", "15"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "no variant named 'c'" in capsys.readouterr().err


def test_an_unknown_revision_or_a_foreign_tree_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="git archive no-such-revision"):
        prepare(Variant("x", "no-such-revision"), tmp_path)
    with pytest.raises(SystemExit, match="not a tidemark tree"):
        prepare(Variant("x", str(tmp_path)), tmp_path)
