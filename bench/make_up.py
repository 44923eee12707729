"""How long `make up` takes from a fresh clone: install, training the default models, serving.

Clones this checkout's HEAD into a temporary folder, runs `make up` there with nothing installed
and no models, and times three marks from its output and files: the install stamp
(`.venv/.installed-stamp`), the surrogate's `config.json` (both default models trained), and the
line `advexplain is up` (both services healthy, samples written). Then sends Ctrl-C (SIGINT to the
whole process group, as a terminal does) and checks that both services shut down cleanly (make
itself then exits by the signal, as make does on Ctrl-C). Writes bench/results/make_up.json.

    flock /tmp/advexplain-cpu.lock python -m bench.make_up
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.common import RESULTS, write_json

ROOT = Path(__file__).resolve().parents[1]
UP_LINE = "advexplain is up"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for the services")
    p.add_argument("--out", type=Path, default=RESULTS / "make_up.json")
    args = p.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="advexplain-make-up-") as tmp:
        clone = Path(tmp) / "advexplain"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "ADVEXPLAIN_"))}
        started = time.perf_counter()
        proc = subprocess.Popen(["make", "up"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        marks: dict[str, float] = {}
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip())
                if UP_LINE in line and "serving" not in marks:
                    marks["serving"] = time.perf_counter() - started

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        files = {"installed": clone / ".venv" / ".installed-stamp",
                 "models_trained": clone / "models" / "surrogate" / "config.json"}
        while "serving" not in marks and proc.poll() is None and time.perf_counter() - started < args.timeout:
            for name, path in files.items():
                if name not in marks and path.exists():
                    marks[name] = time.perf_counter() - started
            time.sleep(0.5)
        serving = "serving" in marks
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the whole group
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        reader.join(timeout=5)
    stopped_cleanly = ("stopping both services" in lines and sum("Application shutdown complete." in line
                                                                   for line in lines) == 2
                       and not any("Traceback" in line for line in lines))
    record = {
        "benchmark": "make_up",
        "commit": commit,
        "seconds_to": {k: round(v, 1) for k, v in marks.items()},
        "serving": serving,
        "both_services_stopped_cleanly": stopped_cleanly,
        "make_exit_code_after_ctrl_c": code,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "log_tail": lines[-40:],
    }
    write_json(args.out, record)
    print(json.dumps({k: record[k] for k in ("seconds_to", "serving", "both_services_stopped_cleanly")}))
    return 0 if serving and stopped_cleanly else 1


if __name__ == "__main__":
    raise SystemExit(main())
