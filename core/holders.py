"""Which process holds a port: named in "port in use" errors, so a user can stop it.

Linux lists sockets in /proc/net/{tcp,tcp6,unix} with their inode; a process's open sockets
are links to ``socket:[inode]`` under /proc/<pid>/fd.  Processes of other users cannot be
looked into without privileges: then nothing is found and the error says so.
"""

from __future__ import annotations

from pathlib import Path

LISTEN = "0A"  # TCP state in /proc/net/tcp


def _tcp_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 9
                and fields[3] == LISTEN
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    return inodes


def _abstract_inodes(name: str) -> set[str]:
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {f[6] for f in (line.split() for line in lines) if len(f) > 7 and f[7] == "@" + name}


def _holders(inodes: set[str]) -> list[int]:
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(str(link.readlink()) in wanted for link in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:
            continue
    return sorted(pids)


def tcp_port_holders(port: int) -> list[int]:
    """Pids of the processes listening on TCP ``port`` (any address)."""
    return _holders(_tcp_inodes(port))


def abstract_socket_holders(name: str) -> list[int]:
    """Pids of the processes holding the abstract Unix socket ``name``."""
    return _holders(_abstract_inodes(name))


def serve_pid_of(pid: int) -> int | None:
    """The ``covidct serve`` a stage runs under (its ``--serve-pid``), if any."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if b"--serve-pid" in args:
        try:
            return int(args[args.index(b"--serve-pid") + 1])
        except (IndexError, ValueError):
            return None
    return None


def describe(pids: list[int]) -> str:
    """ " (pid 123, under covidct serve pid 100)", or "" when nobody was found."""
    if not pids:
        return ""
    serves = sorted({s for p in pids if (s := serve_pid_of(p)) is not None})
    text = f" (pid {', '.join(map(str, pids))}"
    if serves:
        text += f", under covidct serve pid {', '.join(map(str, serves))}"
    return text + ")"
