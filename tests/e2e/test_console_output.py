"""What the demo's ``fit`` writes to a log file and to an odd terminal: into a file, plain lines (one per logging step,
no carriage returns or escape codes) whose last ``val/accuracy`` is the logged one; on a pseudo-terminal that reports
0 columns, a live bar that shows progress."""

import csv
import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time

from conftest import REPO

STEPS, EVERY, VALIDATE = 40, 10, 20
ARGS = ["--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", str(EVERY)]
ARGS += ["--trainer.val_check_interval", str(VALIDATE), "--trainer.callbacks.init_args.max_examples", "40"]


def demo_command(tmp_path) -> list[str]:
    root = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.default_root_dir", str(tmp_path)]
    return [sys.executable, "-m", "pear_lightning", "fit", "--config", "demo", *ARGS, *root]


def logged_accuracy(tmp_path) -> float:
    (metrics,) = (tmp_path / "runs").glob("*/version_*/metrics.csv")
    rows = [row for row in csv.DictReader(metrics.open()) if row.get("val/accuracy")]
    return float(rows[-1]["val/accuracy"])


def test_fit_into_a_log_file_writes_plain_lines_one_per_logging_step(tmp_path):
    log = tmp_path / "log"
    with open(log, "wb") as out:
        subprocess.run(demo_command(tmp_path), cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=600)
    data = log.read_bytes()
    assert b"\x1b" not in data and b"\r" not in data
    text = data.decode()
    progress = [line for line in text.splitlines() if line.startswith("step ") and "/" in line.split()[1]]
    assert [line.split()[1] for line in progress] == [f"{s}/{STEPS}" for s in range(EVERY, STEPS + 1, EVERY)]
    accuracy = [line for line in text.splitlines() if "val/accuracy" in line][-1]
    assert (
        f"val/accuracy {logged_accuracy(tmp_path):.3f}" in accuracy
        or f"val/accuracy {logged_accuracy(tmp_path):.4g}" in accuracy
    )
    assert text.splitlines()[-1] == f"`Trainer.fit` stopped: `max_steps={STEPS}` reached."
    assert len(data) < 12_000 * STEPS / 500 + 4_000  # the fixed lines, then about 100 bytes per logging step


def test_a_terminal_that_reports_no_width_still_shows_the_bar(tmp_path):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 0, 0, 0))  # 24 rows, 0 columns
    process = subprocess.Popen(demo_command(tmp_path), cwd=REPO, stdout=follower, stderr=follower)
    os.close(follower)
    seen, deadline = b"", time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    process.wait(timeout=60)
    assert process.returncode == 0
    text = seen.decode(errors="replace")
    assert f"step {STEPS}/{STEPS} |" in text
    last = text.rsplit("val/accuracy=", 1)[1]
    assert float(last.split("]")[0].split(",")[0]) == round(logged_accuracy(tmp_path), 3)
    stopped = text.index(f"`Trainer.fit` stopped: `max_steps={STEPS}` reached.")
    assert text[stopped - 1] in "\r\n"  # on a line of its own, not glued to the bar
