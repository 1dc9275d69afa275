"""Result rows that outlive a timeout, and the machine they were measured on.

A short-lived GPU machine may be stopped at any moment, and only the files in its output folder
come back. So every row is printed and flushed as one JSON line and appended to its file as soon
as it exists, and a step that fails becomes a row instead of an exception: the steps after it
still run, and the failures are listed at the end.
"""
import json
import os
import sys
import traceback

from engine.records import cpu_model

# The collector takes files under 16 MiB; a row that would pass this is printed, not appended.
MAX_FILE_BYTES = 15 << 20


class Rows:
    """Appends JSON rows to files of one folder; collects the rows of failed steps."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.failures = []
        os.makedirs(out_dir, exist_ok=True)

    def emit(self, file: str, row: dict) -> dict:
        line = json.dumps(row, default=str)
        print(line, flush=True)
        path = os.path.join(self.out_dir, file)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if size + len(line) + 1 > MAX_FILE_BYTES:
            print(f"{file} is full ({size} bytes): the row above is not appended", file=sys.stderr, flush=True)
            return row
        with open(path, "a") as f:
            f.write(line + "\n")
        return row

    def fail(self, file: str, step: str, error: BaseException) -> dict:
        row = dict(step=step, ok=False, error=f"{type(error).__name__}: {error}",
                   traceback=traceback.format_exc()[-2000:])
        self.failures.append(dict(step=step, error=row["error"]))
        return self.emit(file, row)

    def attempt(self, file: str, step: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None with a failure row where it raises."""
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # a failed step must not stop the ones after it
            self.fail(file, step, error)
            return None

    def check(self, file: str, step: str, fn, *args, **kwargs):
        """Run a check returning a row with "ok"; append the row, and count it failed unless ok."""
        row = self.attempt(file, step, fn, *args, **kwargs)
        if row is not None:
            self.emit(file, row)
            if not row["ok"]:
                self.failures.append(dict(step=step, error="out of bounds"))
        return row


def machine() -> dict:
    """What a CPU time depends on: the CPU, its cores, and how busy the machine was."""
    return dict(cpu=cpu_model(), logical_cores=os.cpu_count(), load_average_1min=os.getloadavg()[0])
