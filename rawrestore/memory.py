"""How much memory a command may take before it starts: checks made before allocating, never after."""
from __future__ import annotations


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), or None where that cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


__all__ = ["available_memory"]
