"""The machine's own limit for replication-like work: a plain TLS copy over loopback.

Two processes, the same deployment PKI and TLS contexts as the real link
(``common.tls.server_context`` / ``client_context``, so cipher, curves and certificates are
identical):

- ``serve``: accepts one connection and writes what it receives into a file (offsets wrap
  at ``--size``, like the writer does on the disk), ``fdatasync`` every ``--sync-every``
  bytes and once at the end, then acknowledges the byte count.
- ``send``: sends the same bytes the replication driver writes (benchmarks.driver's
  ``compressible`` 1 MiB blocks) for ``--seconds`` (or exactly ``--bytes``), then waits
  for that acknowledgement.
  Its clock runs from the first byte sent to the acknowledgement: data durable on the
  receiving side, which is what the replication figure counts too.

Options for the initial sync's floors (``benchmarks/sync.py``): ``--zstd LEVEL`` on both
sides (each block compressed by the client, decompressed by the server), ``serve
--direct`` (``O_DIRECT`` writes from an aligned buffer, as the process server writes holes)
and ``--threads N`` on both sides (pipelined over both cores: the client compresses in N
threads while its main thread sends; the server's main thread receives while N threads
decompress and write; every one of those calls releases the GIL).

Wire format (not tidemark's, deliberately minimal): ``u32 length | bytes`` per block,
length 0 ends the stream; the server answers ``u64 total``.

    python -m benchmarks.tls_copy serve --pki DIR --out FILE --size BYTES
    python -m benchmarks.tls_copy send --bundle FILE --port PORT --seconds 30

:func:`run_baseline` runs both as child processes and samples their RSS and CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.metrics import MIB, ProcessSampler, mb_per_s
from common.durable import pwrite_all

PYTHON = sys.executable
SYNC_EVERY = 64 * MIB
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses
IO_TIMEOUT = 120.0


def _recv_exact(sock: Any, view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(f"peer closed after {got} of {n} bytes")
        got += k


def _receive_serial(
    conn: Any,
    fd: int,
    direct_fd: int | None,
    aligned: Any,
    size: int,
    block: int,
    zstd: bool,
    sync_every: int,
) -> tuple[int, int]:
    """Receive, decompress and write one block after another; returns (bytes, syncs)."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    # Received bytes land in `buf`; what is written to the file lies in `chunk` (in the
    # aligned buffer when writing with O_DIRECT).
    buf = bytearray(max(block, 1)) if aligned is None or zstd else aligned
    view = memoryview(buf)
    target = memoryview(aligned) if aligned is not None else None
    hdr = memoryview(bytearray(4))
    total = offset = since_sync = syncs = 0
    while True:
        _recv_exact(conn, hdr)
        n = int.from_bytes(hdr, "big")
        if n == 0:
            break
        if n > len(buf):
            if buf is aligned:
                raise ValueError(f"a block of {n} bytes, over --block {block}")
            buf = bytearray(n)  # (compressed blocks of incompressible data grow)
            view = memoryview(buf)
        chunk = view[:n]
        _recv_exact(conn, chunk)
        if zstd:  # the frame says its content size
            chunk = memoryview(decompressor.decompress(chunk))
            n = len(chunk)
            if target is not None:  # into the aligned buffer: one more copy
                if n > len(target):
                    raise ValueError(f"a block of {n} bytes, over --block {block}")
                target[:n] = chunk
                chunk = target[:n]
        if offset + n > size:
            offset = 0
        _write_block(fd, direct_fd, chunk, offset)
        offset += n
        total += n
        since_sync += n
        if since_sync >= sync_every:
            os.fdatasync(fd)
            syncs += 1
            since_sync = 0
    os.fdatasync(fd)  # one inode: covers the O_DIRECT writes too
    return total, syncs + 1


def _write_block(fd: int, direct_fd: int | None, chunk: memoryview, offset: int) -> None:
    """The block's whole 4 KiB pages with O_DIRECT when ``direct_fd`` (``chunk`` is then in an
    aligned buffer), the rest through the page cache."""
    n = len(chunk)
    whole = n - n % DIRECT_ALIGN if direct_fd is not None else 0
    if whole and direct_fd is not None:
        pwrite_all(direct_fd, chunk[:whole], offset)
    if whole < n:
        pwrite_all(fd, chunk[whole:], offset + whole)


class _PipelinedWriter:
    """The server's side of ``--threads``: the calling thread receives blocks into buffers
    from a small pool and queues them with their file offsets; ``threads`` workers each
    decompress into (or copy into, with O_DIRECT) an aligned buffer of their own and write.
    A block's offset is known on receipt: a zstd frame states its content size."""

    def __init__(
        self, fd: int, direct_fd: int | None, size: int, block: int, zstd: bool, threads: int
    ) -> None:
        import mmap
        import queue

        self.fd = fd
        self.direct_fd = direct_fd
        self.size = size
        self.block = max(block, 1)
        self.zstd = zstd
        self.threads = threads
        self.work: queue.Queue[tuple[Any, int, int] | None] = queue.Queue()
        self.free: queue.Queue[Any] = queue.Queue()
        # Plain blocks written with O_DIRECT are received straight into aligned buffers.
        self.in_place = direct_fd is not None and not zstd
        for _ in range(2 * threads):
            self.free.put(
                mmap.mmap(-1, self.block)
                if self.in_place
                else bytearray(self.block + self.block // 8 + 4096)
            )
        self.errors: list[BaseException] = []

    def receive(self, conn: Any, sync_every: int) -> tuple[int, int]:
        """Until the end marker; returns (bytes written, fdatasyncs). ``sync_every``: wait for
        the queued blocks to be written, then fdatasync."""
        import threading

        import zstandard

        workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]
        for t in workers:
            t.start()
        hdr = memoryview(bytearray(4))
        total = offset = since_sync = syncs = 0
        try:
            while not self.errors:
                _recv_exact(conn, hdr)
                n = int.from_bytes(hdr, "big")
                if n == 0:
                    break
                buf = self.free.get()
                if n > len(buf):
                    buf = bytearray(n)  # (compressed blocks of incompressible data grow)
                _recv_exact(conn, memoryview(buf)[:n])
                size = zstandard.frame_content_size(buf[:18]) if self.zstd else n
                if size < 0:
                    raise ValueError("a zstd frame that does not state its content size")
                if size > self.block:
                    raise ValueError(f"a block of {size} bytes, over --block {self.block}")
                if offset + size > self.size:
                    offset = 0
                self.work.put((buf, n, offset))
                offset += size
                total += size
                since_sync += size
                if since_sync >= sync_every:
                    self.work.join()
                    os.fdatasync(self.fd)
                    syncs += 1
                    since_sync = 0
        finally:
            for _ in workers:
                self.work.put(None)
            for t in workers:
                t.join()
        if self.errors:
            raise self.errors[0]
        os.fdatasync(self.fd)  # one inode: covers the O_DIRECT writes too
        return total, syncs + 1

    def _work(self) -> None:
        import mmap

        import zstandard

        decompressor = zstandard.ZstdDecompressor()
        aligned = (
            memoryview(mmap.mmap(-1, self.block))
            if self.direct_fd is not None and not self.in_place
            else None
        )
        while (item := self.work.get()) is not None:
            buf, n, offset = item
            try:
                if not self.errors:
                    chunk = memoryview(buf)[:n]
                    if self.zstd:
                        chunk = memoryview(decompressor.decompress(chunk))
                    if aligned is not None:  # into the aligned buffer: one more copy
                        aligned[: len(chunk)] = chunk
                        chunk = aligned[: len(chunk)]
                    _write_block(self.fd, self.direct_fd, chunk, offset)
            except BaseException as exc:  # handed to the receiving thread
                self.errors.append(exc)
            finally:
                self.free.put(buf)
                self.work.task_done()
        self.work.task_done()


def serve(
    pki_dir: Path,
    out: Path,
    size: int,
    sync_every: int,
    block: int,
    zstd: bool = False,
    direct: bool = False,
    threads: int = 0,
) -> int:
    """With ``direct``, blocks are written with ``O_DIRECT`` from a page-aligned buffer (as
    the process server writes an initial sync's data into the replica's holes): no page
    cache. ``block`` must then be a multiple of 4 KiB; a block's unaligned tail (the last
    block of a ``--bytes`` run) goes through the page cache. With ``threads``, blocks are
    decompressed and written by that many threads while this one receives
    (:class:`_PipelinedWriter`)."""
    import mmap

    from common.tls import server_context

    if direct and block % DIRECT_ALIGN:
        raise ValueError(f"--direct needs a --block multiple of {DIRECT_ALIGN}, got {block}")
    ctx = server_context(pki_dir)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    direct_fd: int | None = None
    aligned = mmap.mmap(-1, max(block, 1)) if direct else None
    try:
        os.ftruncate(fd, size)  # sparse, like a fresh replica
        if direct:
            try:
                direct_fd = os.open(out, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # the filesystem refuses it: buffered, and the result says so
                aligned = None
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(IO_TIMEOUT)
            print(json.dumps({"port": listener.getsockname()[1], "pid": os.getpid()}), flush=True)
            raw, _ = listener.accept()
        raw.settimeout(IO_TIMEOUT)
        with ctx.wrap_socket(raw, server_side=True) as conn:
            if threads:
                writer = _PipelinedWriter(fd, direct_fd, size, block, zstd, threads)
                total, syncs = writer.receive(conn, sync_every)
            else:
                total, syncs = _receive_serial(
                    conn, fd, direct_fd, aligned, size, block, zstd, sync_every
                )
            conn.sendall(total.to_bytes(8, "big"))
            cipher = conn.cipher()
            version = conn.version()
        print(
            json.dumps(
                {
                    "bytes": total,
                    "syncs": syncs,
                    "direct": direct_fd is not None,
                    "cipher": cipher[0] if cipher else None,
                    "tls_version": version,
                    "threads": threads,
                }
            ),
            flush=True,
        )
    finally:
        os.close(fd)
        if direct_fd is not None:
            os.close(direct_fd)
        # (the aligned buffer goes with the process: views of it may still be up)
    return 0


def _more(sent: int, nbytes: int, start: float, seconds: float) -> bool:
    """Is there more to send: ``nbytes`` in all when given, else for ``seconds``?"""
    return sent < nbytes if nbytes else time.monotonic() - start < seconds


def _send_pipelined(
    conn: Any,
    plain: list[bytes],
    block: int,
    nbytes: int,
    seconds: float,
    level: int,
    threads: int,
) -> int:
    """``send``'s loop with the compression in ``threads`` threads (a zstd context each),
    up to two blocks per thread ahead of this one, which sends them in order."""
    import threading
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    import zstandard

    local = threading.local()

    def pack(data: bytes) -> bytes:
        compressor = getattr(local, "compressor", None)
        if compressor is None:
            compressor = local.compressor = zstandard.ZstdCompressor(level=level)
        packed = compressor.compress(data)
        return len(packed).to_bytes(4, "big") + packed

    sent = i = 0
    start = time.monotonic()
    pending: deque[Future[bytes]] = deque()
    with ThreadPoolExecutor(threads) as pool:
        while True:
            while _more(sent, nbytes, start, seconds) and len(pending) < 2 * threads:
                n = min(block, nbytes - sent) if nbytes else block
                pending.append(pool.submit(pack, plain[i % 16][:n]))
                sent += n
                i += 1
            if not pending:
                return sent
            conn.sendall(pending.popleft().result())


def send(
    bundle: Path,
    port: int,
    seconds: float,
    block: int,
    nbytes: int = 0,
    zstd: int | None = None,
    threads: int = 0,
) -> int:
    """Send for ``seconds``, or exactly ``nbytes`` when that is given (the last block cut
    short); with ``zstd`` each block is compressed at that level as it is sent (the cost is
    the point), in ``threads`` threads while this one sends when that is given."""
    import zstandard

    from benchmarks.driver import compressible
    from common.tls import CLIENT_SERVER_HOSTNAME, client_context
    from process_server.pki import load_bundle

    ctx = client_context(load_bundle(bundle))
    # Same 16 blocks as benchmarks.driver's "load" op, each with its length prefix.
    plain = [compressible(i, block) for i in range(16)]
    blocks = [len(b).to_bytes(4, "big") + b for b in plain]
    compressor = zstandard.ZstdCompressor(level=zstd) if zstd is not None else None
    with (
        socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname=CLIENT_SERVER_HOSTNAME) as conn,
    ):
        sent = 0
        i = 0
        start = time.monotonic()
        if threads and zstd is not None:  # (plain blocks: sending is all there is to do)
            sent = _send_pipelined(conn, plain, block, nbytes, seconds, zstd, threads)
        else:
            while _more(sent, nbytes, start, seconds):
                n = min(block, nbytes - sent) if nbytes else block
                if compressor is not None:
                    packed = compressor.compress(plain[i % 16][:n])
                    conn.sendall(len(packed).to_bytes(4, "big") + packed)
                elif n == block:
                    conn.sendall(blocks[i % 16])
                else:
                    conn.sendall(n.to_bytes(4, "big") + plain[i % 16][:n])
                sent += n
                i += 1
        conn.sendall(b"\0\0\0\0")
        send_done = time.monotonic()
        ack = memoryview(bytearray(8))
        _recv_exact(conn, ack)
        end = time.monotonic()
        acked = int.from_bytes(ack, "big")
    if acked != sent:
        print(json.dumps({"error": f"server acknowledged {acked} bytes, sent {sent}"}), flush=True)
        return 1
    print(
        json.dumps({"bytes": sent, "send_seconds": send_done - start, "seconds": end - start}),
        flush=True,
    )
    return 0


def _read_json_line(proc: subprocess.Popen[bytes], what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} exited ({proc.wait()}) without a result")
    return dict(json.loads(line))


def _reap(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def run_baseline(
    *,
    pki_dir: Path,
    bundle: Path,
    out: Path,
    seconds: float,
    block: int,
    size: int,
    sync_every: int = SYNC_EVERY,
    log: Path | None = None,
    nbytes: int = 0,
    zstd: int | None = None,
    direct: bool = False,
    threads: int = 0,
) -> dict[str, Any]:
    """Run the server and client processes; return throughput and per-process RSS/CPU.

    Raises RuntimeError if either side fails. Both children are gone when this returns, and
    ``out`` is removed.
    """
    log_f = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "benchmarks.tls_copy",
                "serve",
                "--pki",
                str(pki_dir),
                "--out",
                str(out),
                "--size",
                str(size),
                "--sync-every",
                str(sync_every),
                "--block",
                str(block),
                *(["--zstd", str(zstd)] if zstd is not None else []),
                *(["--direct"] if direct else []),
                *(["--threads", str(threads)] if threads else []),
            ],
            stdout=subprocess.PIPE,
            stderr=log_f,
            start_new_session=True,
        )
        procs.append(server)
        port = int(_read_json_line(server, "tls_copy server")["port"])
        client = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "benchmarks.tls_copy",
                "send",
                "--bundle",
                str(bundle),
                "--port",
                str(port),
                "--seconds",
                str(seconds),
                "--block",
                str(block),
                "--bytes",
                str(nbytes),
                *(["--zstd", str(zstd)] if zstd is not None else []),
                *(["--threads", str(threads)] if threads else []),
            ],
            stdout=subprocess.PIPE,
            stderr=log_f,
            start_new_session=True,
        )
        procs.append(client)
        sampler = ProcessSampler({"client": client.pid, "server": server.pid}).start()
        try:
            sent = _read_json_line(client, "tls_copy client")
            received = _read_json_line(server, "tls_copy server")
        finally:
            stats = sampler.stop()
        if "error" in sent:
            raise RuntimeError(f"tls_copy: {sent['error']}")
        for proc in procs:
            _reap(proc)
        if client.returncode or server.returncode:
            raise RuntimeError(
                f"tls_copy: client exited {client.returncode}, server {server.returncode}"
            )
        nbytes = int(sent["bytes"])
        return {
            "bytes": nbytes,
            "seconds": sent["seconds"],
            "send_seconds": sent["send_seconds"],
            "mb_per_s": mb_per_s(nbytes, sent["seconds"]),
            "syncs": received["syncs"],
            "direct": received["direct"],
            "cipher": received["cipher"],
            "tls_version": received["tls_version"],
            "threads": received["threads"],
            "processes": {label: st.as_dict() for label, st in stats.items()},
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            _reap(proc)
        if not isinstance(log_f, int):
            log_f.close()
        with contextlib.suppress(OSError):
            out.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tls_copy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="receive one stream into a file")
    s.add_argument("--pki", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--size", type=int, required=True)
    s.add_argument("--sync-every", type=int, default=SYNC_EVERY)
    s.add_argument("--block", type=int, default=MIB)
    s.add_argument("--direct", action="store_true", help="write with O_DIRECT (no page cache)")
    c = sub.add_parser("send", help="send blocks for N seconds")
    c.add_argument("--bundle", type=Path, required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--seconds", type=float, default=30.0)
    c.add_argument("--block", type=int, default=MIB)
    c.add_argument("--bytes", type=int, default=0, help="send this many bytes instead")
    for p in (s, c):
        p.add_argument("--zstd", type=int, default=None, help="compress each block (level)")
        p.add_argument(
            "--threads", type=int, default=0, help="pipelined: compress or write in N threads"
        )
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return serve(
            args.pki,
            args.out,
            args.size,
            args.sync_every,
            args.block,
            args.zstd is not None,
            args.direct,
            args.threads,
        )
    return send(
        args.bundle, args.port, args.seconds, args.block, args.bytes, args.zstd, args.threads
    )


if __name__ == "__main__":
    sys.exit(main())
