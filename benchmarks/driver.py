"""A writer process: runs an agent through its Python API and obeys JSON commands on stdin.

Tests and benchmarks start it as a child so they can SIGKILL the agent at any
moment while knowing exactly which writes were acknowledged. One command per
line, one JSON reply per line:

    {"op": "write", "disk": "d", "offset": 0, "length": 4096, "seed": 7}   -> {"ok": true, "seq": 1}
    {"op": "zero" | "trim", "disk": "d", "offset": 0, "length": 4096}
    {"op": "flush", "disk": "d"}          {"op": "drain", "timeout": 60}
    {"op": "status"}                       {"op": "quit"}
    {"op": "load", "disk": "d", "seconds": 30, "block": 1048576, "compressible": true}

Data of a write is ``pattern(seed, length)``, so the caller can recompute it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from agent.service import Agent
from common.config import load_agent_config
from common.errors import DiskError


def pattern(seed: int, length: int) -> bytes:
    """Deterministic pseudo-random bytes (incompressible)."""
    return random.Random(seed).randbytes(length)


def compressible(seed: int, length: int) -> bytes:
    """About 2:1 compressible bytes: random halves interleaved with zeros every 512 bytes."""
    rnd = random.Random(seed).randbytes(length // 2 + 256)
    out = bytearray(length)
    for i in range(0, length, 512):
        out[i : i + 256] = rnd[i // 2 : i // 2 + 256][: max(0, min(256, length - i))]
    return bytes(out)


async def _load(agent: Agent, cmd: dict[str, Any]) -> dict[str, Any]:
    """Sustained sequential writes for ``seconds``; returns bytes written and timings."""
    disk = agent.disk(cmd["disk"])
    block = int(cmd.get("block", 1 << 20))
    seconds = float(cmd.get("seconds", 10))
    gen = compressible if cmd.get("compressible", True) else pattern
    blocks = [gen(i, block) for i in range(16)]
    written = 0
    offset = 0
    laps = 0
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < seconds:
        if offset + block > disk.size:
            offset = 0
            laps += 1  # each lap writes other bytes at each offset, so a lost write shows
        await disk.write(offset, blocks[(i + laps) % 16])
        offset += block
        written += block
        i += 1
        if i % 64 == 0:
            await disk.flush()
    await disk.flush()
    write_done = time.monotonic()
    drained = await agent.wait_drained(float(cmd.get("drain_timeout", 600)))
    return {
        "bytes": written,
        "write_seconds": write_done - start,
        "drain_seconds": time.monotonic() - start,
        "drained": drained,
    }


async def serve(config: Path) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with Agent(load_agent_config(config)) as agent:
        print(json.dumps({"ok": True, "ready": True, "pid": os.getpid()}), flush=True)
        while True:
            line = await reader.readline()
            if not line:
                return
            cmd = json.loads(line)
            reply: dict[str, Any] = {"ok": True}
            try:
                op = cmd["op"]
                if op == "write":
                    data = pattern(int(cmd["seed"]), int(cmd["length"]))
                    reply["seq"] = await agent.disk(cmd["disk"]).write(
                        int(cmd["offset"]), data, fua=bool(cmd.get("fua"))
                    )
                elif op == "zero":
                    reply["seq"] = await agent.disk(cmd["disk"]).write_zeroes(
                        int(cmd["offset"]), int(cmd["length"])
                    )
                elif op == "trim":
                    reply["seq"] = await agent.disk(cmd["disk"]).trim(
                        int(cmd["offset"]), int(cmd["length"])
                    )
                elif op == "flush":
                    await agent.disk(cmd["disk"]).flush()
                elif op == "drain":
                    reply["drained"] = await agent.wait_drained(float(cmd.get("timeout", 60)))
                elif op == "status":
                    reply["status"] = agent.status()
                elif op == "load":
                    reply.update(await _load(agent, cmd))
                elif op == "quit":
                    print(json.dumps(reply), flush=True)
                    return
                else:
                    reply = {"ok": False, "error": f"unknown op {op!r}"}
            except DiskError as exc:
                reply = {"ok": False, "error": str(exc), "errno": exc.errno}
            print(json.dumps(reply), flush=True)


def main() -> None:
    from common.cli import run_loop, setup_logging

    setup_logging(os.environ.get("TIDEMARK_LOG_LEVEL", "WARNING"))

    async def _main() -> int:
        await serve(Path(sys.argv[1]))
        return 0

    sys.exit(run_loop(_main()))


if __name__ == "__main__":
    main()
