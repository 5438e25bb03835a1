"""The master target (source site, failback).

After a committed failover the disk at the DR site is live. The master target
runs beside the original source disk and receives the *reverse* stream: only the
extents that differ between the DR disk and the source travel back, through the
same frames, batch codec, TLS and exactly-once resume as forward replication
(the process server's receiver and applier, roles swapped). Then forward
protection resumes without a full copy. Built by the failback issue.
"""
