"""What every benchmark script ends with: the machine facts, the rows as JSON, and a markdown table."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_avg_at_end": os.getloadavg()}


def save_and_print(out: str | Path, meta: dict[str, Any], rows: list[dict[str, Any]], header: list[str],
                   line: Callable[[dict[str, Any]], list[str]]) -> None:
    """Write {"meta", "rows"} to ``out`` and print ``meta`` and a markdown table (``line(row)`` -> cells)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{meta}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(line(r)) + " |")
