"""Turn a folder of benchmark logs (benchmarks/gpu_suite.sh) into a RESULTS.md section: device, date,
torch version, and each benchmark's printed figures, verbatim.

    python benchmarks/collect_results.py benchmarks/gpu_logs/DATE >> benchmarks/RESULTS.md
"""
import datetime
import platform
import sys
from pathlib import Path

import torch


def section(logs: Path) -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'unknown'})"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## {date} · {device} · torch {torch.__version__}\n"]
    for log in sorted(logs.glob("*.txt")):
        text = log.read_text(errors="replace").strip().splitlines()
        lines += [f"### {log.stem}", "```", *[line for line in text if "%|" not in line][-40:], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(section(Path(sys.argv[1])))
