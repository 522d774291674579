"""What /proc says about processes: alive or zombie, and whose children they are.

Read straight from /proc rather than from billiard's bookkeeping: the crash-loop guard asks about a
child that died, and the shutdown watchdog about a pool whose bookkeeping may be what hangs.
"""

from __future__ import annotations

import os
from pathlib import Path


def stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/PID/stat file after the command name (state first, then ppid), or [] if gone."""
    try:
        # The command name may hold spaces and parentheses: split after its last ")".
        return stat.read_text(encoding="ascii").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def is_alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie."""
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    return bool(fields) and fields[0] != "Z"


def child_pids(parent: int | None = None) -> list[int]:
    """Pids of the children of `parent` (default: this process)."""
    wanted = str(os.getpid() if parent is None else parent)
    return [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat") if stat_fields(stat)[1:2] == [wanted]]
