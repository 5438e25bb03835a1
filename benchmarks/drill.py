"""The local disaster-recovery drill: a whole deployment on loopback, driven step by step.

It protects a generated disk, writes to it, kills the process server in the middle
of the stream, and shows the replica converge to a byte-identical copy. Each step
prints what it does and what it checked; exit code 0 only if every check passed.
Later capabilities (NBD writers, failover, failback) add their steps here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.deploy import Deployment, Driver

DISK = "web01-root"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _writes(driver: Driver, rng: random.Random, size: int, total: int, label: str) -> int:
    written = 0
    seq = 0
    while written < total:
        length = rng.choice([4096, 65536, 1 << 20])
        offset = rng.randrange(0, size - length) // 4096 * 4096
        kind = rng.random()
        if kind < 0.85:
            reply = driver.call(
                op="write", disk=DISK, offset=offset, length=length, seed=rng.randrange(1 << 30)
            )
        elif kind < 0.95:
            reply = driver.call(op="zero", disk=DISK, offset=offset, length=length)
        else:
            reply = driver.call(op="trim", disk=DISK, offset=offset, length=length)
        if not reply["ok"]:
            raise RuntimeError(f"write failed: {reply}")
        seq = int(reply["seq"])
        written += length
        if seq % 200 == 0:
            print(f"   {label}: {written >> 20} MiB written, seq {seq}", flush=True)
    driver.call(op="flush", disk=DISK)
    return seq


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="tidemark-drill-"))
    size = args.size_mib << 20
    rng = random.Random(args.seed)
    ok = True
    with Deployment(root) as dep:
        _step(f"set-up in {root}: deployment CA, process server, agent web01")
        dep.init_pki()
        image = root / f"{DISK}.img"
        with open(image, "wb") as f:  # a disk that already holds data: an OS image, say
            f.truncate(size)
            for offset in range(0, size // 4, 1 << 20):
                f.seek(offset * 2)
                f.write(rng.randbytes(1 << 20))
        spec = dep.add_agent("web01", {DISK: image}, nbd=True)
        print(dep.ps_config.read_text() + "\n" + spec.config.read_text())
        dep.start_ps()
        t0 = time.monotonic()
        driver = Driver(dep, "web01")
        try:
            _step("initial sync: only what the replica lacks is sent (holes are free)")
            while (row := driver.call(op="status")["status"]["disks"][0])[
                "state"
            ] == "initial-sync":
                time.sleep(0.2)
            print(f"   initial sync done in {time.monotonic() - t0:.1f}s: state {row['state']}")

            _step(
                f"protect {DISK} ({args.size_mib} MiB) and write {args.write_mib} MiB of mixed writes"
            )
            t0 = time.monotonic()
            _writes(driver, rng, size, args.write_mib << 20, "phase 1")
            print(f"   written in {time.monotonic() - t0:.1f}s")

            _step(
                "kill -9 the process server while more writes arrive; the agent's journal holds them"
            )
            dep.kill_ps()
            last = _writes(
                driver, rng, size, max(1, args.write_mib // 2) << 20, "phase 2 (server down)"
            )
            agent_rows = driver.call(op="status")["status"]["disks"]
            print(
                f"   agent journal: {agent_rows[0]['lag_bytes'] >> 20} MiB waiting, state {agent_rows[0]['state']}"
            )

            _step("restart the process server; replication resumes where it stopped")
            dep.start_ps()
            t1 = time.monotonic()
            drained = driver.call(op="drain", timeout=120)["drained"]
            row = dep.wait_applied(DISK, last, timeout=120)
            print(
                f"   drained={drained} in {time.monotonic() - t1:.1f}s; applied_seq={row['applied_seq']}"
            )
            ok &= bool(drained)

            if shutil.which("qemu-io"):
                _step("a VM writes through the NBD export (qemu-io), every write journaled first")
                uri = f"nbd+unix:///{DISK}?socket={spec.nbd[DISK]}"
                cmds = [
                    "write -P 0x5a 0 1M",
                    "write -z 2M 512k",
                    "discard 4M 1M",
                    "write -P 0x17 9M 64k",
                    "flush",
                    "read -P 0x5a 0 1M",
                    "read -P 0x17 9M 64k",
                ]
                qemu_args = ["qemu-io", "-f", "raw"] + [x for c in cmds for x in ("-c", c)] + [uri]
                out = subprocess.run(qemu_args, capture_output=True, text=True)
                print("   " + out.stdout.strip().replace("\n", "\n   "))
                ok &= out.returncode == 0 and "Pattern verification failed" not in out.stdout
                drained = driver.call(op="drain", timeout=120)["drained"]
                last = driver.call(op="status")["status"]["disks"][0]["journaled_seq"]
                dep.wait_applied(DISK, last, timeout=120)
            else:
                print("\n(qemu-io not installed: the NBD step is skipped)")

            _step("verify by digests (tidemark-agent verify): source and replica at one seq")
            out = dep.cli("agent.cli", "verify", "--config", str(spec.config), DISK, check=False)
            print("   " + out.stdout.strip())
            ok &= out.returncode == 0

            _step("status on both sides (tidemark-agent status / tidemark-ps status)")
            print(
                dep.cli("agent.cli", "status", "--config", str(dep.agents["web01"].config)).stdout
            )
            print(dep.cli("process_server.cli", "status", "--config", str(dep.ps_config)).stdout)

            _step(
                "compare source and replica byte for byte (sha256 computed here, outside tidemark)"
            )
            source, replica = (
                _sha256(dep.agents["web01"].disks[DISK]),
                _sha256(dep.replica_path(DISK)),
            )
            same = source == replica
            print(
                f"   source  {source}\n   replica {replica}\n   {'IDENTICAL' if same else 'DIFFERENT'}"
            )
            ok &= same
            if args.json:
                Path(args.json).write_text(
                    json.dumps({"ok": ok, "source": source, "replica": replica})
                )
        finally:
            driver.quit()
    if not args.keep and not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ndrill {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="drill", description="local disaster-recovery drill on loopback"
    )
    parser.add_argument("--size-mib", type=int, default=512, help="disk size (default 512)")
    parser.add_argument(
        "--write-mib", type=int, default=64, help="data written in phase 1 (default 64)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--dir", help="work directory (default: a temporary one, removed afterwards)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", help="write the result as JSON here")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
