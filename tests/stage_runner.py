"""Run several stage scripts' main() one after another in one fresh process, as reproduce.py's
workers do: `python tests/stage_runner.py CALLS [SNAPSHOTS]` (or under torchrun), where CALLS is a
JSON list of [module, argv] (one only under torchrun: a stage keeps the process group until its
process exits) and SNAPSHOTS a JSON object {checkpoint: {step: copy}}: right after a
run writes `checkpoint` at `step`, it is copied to `copy`, the file a run killed then would have
left. Exits with the first failing run's status."""
import importlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    calls = json.loads(sys.argv[1])
    snapshots = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    if snapshots:
        from engine.state import StageState
        write = StageState.write

        def write_and_copy(self, step):
            write(self, step)
            copy = snapshots.get(str(self.path), {}).get(str(step))
            if copy:
                shutil.copy(self.path, copy)
        StageState.write = write_and_copy
    for module, argv in calls:
        sys.argv = [module, *argv]
        importlib.import_module(module).main(argv)


if __name__ == "__main__":
    main()
