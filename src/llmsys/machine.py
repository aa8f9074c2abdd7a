"""What machine this is, in words: for benchmark JSON, fitted profiles and `llmsys info`."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU model ("Intel(R) Xeon(R) ..."), or the architecture where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
