"""Report helpers shared by the benchmark scripts: machine facts and number formats."""

from __future__ import annotations

import platform


def short_error(exc: BaseException, limit: int = 160) -> str:
    """One table-safe line naming the error."""
    text = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def humanize(rate: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= limit * 0.9995:  # (999.6 would print as 1e+03 in the unit below)
            return f"{rate / limit:.3g}{suffix}"
    return f"{rate:.3g}"


def format_ratio(ratio: float) -> str:
    """Two decimals, or two significant digits for ratios well below 0.1."""
    return f"{ratio:.2f}x" if ratio >= 0.095 else f"{ratio:.2g}x"
