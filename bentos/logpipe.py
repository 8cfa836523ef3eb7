"""Run a command with its output written to a size-rotated log file.

    python -m bentos.logpipe LOG_FILE MAX_BYTES BACKUPS -- COMMAND ...

``retrieval-service start`` runs ``bentoml serve`` under it, so ``<data_dir>/serve.log`` never grows past
``MAX_BYTES`` (older output moves to ``serve.log.1`` .. ``serve.log.BACKUPS``). It forwards SIGTERM / SIGINT to
the command and exits with the command's exit code.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from logging.handlers import RotatingFileHandler


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 3:
        print("usage: python -m bentos.logpipe LOG_FILE MAX_BYTES BACKUPS -- COMMAND ...", file=sys.stderr)
        return 2
    log_file, max_bytes, backups = argv[0], int(argv[1]), int(argv[2])
    command = argv[4:]
    handler = RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    out = logging.getLogger("logpipe")
    out.propagate = False
    out.addHandler(handler)
    out.setLevel(logging.INFO)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", bufsize=1)

    def forward(signum, _frame):
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    assert proc.stdout is not None
    for line in proc.stdout:
        out.info(line.rstrip("\n"))
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
