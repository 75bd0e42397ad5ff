"""What the benchmarks record about the machine they ran on."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for result files and their names."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_tag() -> str:
    """A short file-name tag for the CPU: its vendor word ("amd", "intel"), letters and digits only."""
    words = cpu_name().lower().replace("(r)", "").replace("(tm)", "").split()
    return "".join(c for c in (words[0] if words else "") if c.isalnum()) or "unknown"
