"""A floor for the NBD front: the least a Python NBD server can do for a write (an experiment).

Not a product component and not a scenario: a reference point for ``docs/benchmarks.md``
(``nbd``, "Where the agent's time goes"). One asyncio (uvloop) server, fixed newstyle
handshake, ``NBD_OPT_GO`` only, simple replies; a WRITE's payload is read and then:

- ``once``: ``pwrite`` into the image (what ``nbdkit file`` does);
- ``twice``: appended to a journal file (a pre-written 256 MiB ring, like the agent's reused
  segments) and then ``pwrite`` into the image: the two writes the NBD issue asks for before
  a reply, with nothing else (no checksums, no activity log, no replication, no FLUSH);
- ``twice-threads``: the same two writes in two worker threads at once.

Each mode reads requests with ``asyncio.StreamReader``; with the suffix ``-inplace``
(``once-inplace``, ``twice-inplace``) it reads them with the agent's own ``NbdStream``
(agent/nbd_stream.py: a payload received straight into a buffer of its own), which is how
docs/nbd.md ("Reading requests") compares the two.

Usage: ``python -m benchmarks.nbd_floor SOCKET MODE IMAGE JOURNAL`` (IMAGE exists, 4 GiB),
then e.g. ``fio --ioengine=nbd --uri=nbd+unix:///?socket=SOCKET --rw=randwrite --bs=4k
--iodepth=16 --size=4g --time_based --runtime=10``.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from concurrent.futures import ThreadPoolExecutor

from agent.nbd_stream import NbdStream
from protocol import nbd

SIZE = 4 << 30
JOURNAL_BYTES = 256 << 20
_REQUEST = struct.Struct(">IHHQQI")
_OPTION_REPLY = struct.Struct(">QIII")
# flushes are answered, not done
_FLAGS = nbd.FLAG_HAS_FLAGS | nbd.FLAG_SEND_FLUSH | nbd.FLAG_SEND_FUA


MODES = ("once", "twice", "twice-threads", "once-inplace", "twice-inplace")


class FloorServer:
    def __init__(self, mode: str, image: str, journal: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        self.inplace = mode.endswith("-inplace")
        mode = mode.removesuffix("-inplace")
        self.mode = mode
        self.image = os.open(image, os.O_RDWR)
        self.journal = os.open(journal, os.O_RDWR | os.O_CREAT, 0o600)
        self.journal_pos = 0
        self.pool = ThreadPoolExecutor(2) if mode == "twice-threads" else None
        if mode != "once":
            block = bytes(1 << 20)
            for pos in range(0, JOURNAL_BYTES, len(block)):
                os.pwrite(self.journal, block, pos)
            os.fsync(self.journal)

    def append(self, payload: bytes | memoryview) -> None:
        head = struct.pack(">QQI", 0, 0, len(payload))
        if self.journal_pos + len(head) + len(payload) > JOURNAL_BYTES:
            self.journal_pos = 0
        os.pwritev(self.journal, [head, payload], self.journal_pos)
        self.journal_pos += len(head) + len(payload)

    async def write(self, payload: bytes | memoryview, offset: int) -> None:
        if self.mode == "once":
            os.pwrite(self.image, payload, offset)
        elif self.mode == "twice":
            self.append(payload)
            os.pwrite(self.image, payload, offset)
        else:
            loop = asyncio.get_running_loop()
            assert self.pool is not None
            await asyncio.gather(
                loop.run_in_executor(self.pool, self.append, payload),
                loop.run_in_executor(self.pool, os.pwrite, self.image, payload, offset),
            )

    async def handle_inplace(self, stream: NbdStream) -> None:
        await self.handle(stream, stream)  # type: ignore[arg-type]  # the same methods

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, 3))
        await reader.readexactly(4)  # client flags
        while True:
            _, option, length = struct.unpack(">QII", await reader.readexactly(16))
            await reader.readexactly(length)
            if option == nbd.OPT_GO:
                info = struct.pack(">HQH", 0, SIZE, _FLAGS)
                writer.write(
                    _OPTION_REPLY.pack(nbd.OPTION_REPLY_MAGIC, option, nbd.REP_INFO, len(info))
                    + info
                )
                writer.write(_OPTION_REPLY.pack(nbd.OPTION_REPLY_MAGIC, option, nbd.REP_ACK, 0))
                break
            writer.write(_OPTION_REPLY.pack(nbd.OPTION_REPLY_MAGIC, option, nbd.REP_ERR_UNSUP, 0))
        while True:
            try:
                _, _, command, handle, offset, length = _REQUEST.unpack(
                    await reader.readexactly(_REQUEST.size)
                )
            except asyncio.IncompleteReadError:
                return
            if command == nbd.CMD_DISC:
                writer.close()
                return
            if command == nbd.CMD_WRITE:
                if isinstance(reader, NbdStream):
                    await self.write(await reader.read_payload(length), offset)
                else:
                    await self.write(await reader.readexactly(length), offset)
            writer.write(nbd.simple_reply(handle))
            if writer.transport.get_write_buffer_size() > 1 << 20:
                await writer.drain()


async def serve(socket_path: str, mode: str, image: str, journal: str) -> None:
    floor = FloorServer(mode, image, journal)
    if floor.inplace:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: NbdStream(floor.handle_inplace), socket_path)
    else:
        server = await asyncio.start_unix_server(floor.handle, socket_path)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(*argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
