"""Stage runs one after another in one process, as a worker of reproduce.py runs them, each run's
outcome printed as one JSON line {name, ok, seconds, last} as it ends.

    python -m bench.run_stages CALLS.json [--no-cudnn-autotune]

CALLS.json: a list of [name, script module, argv, console log file]. --no-cudnn-autotune leaves
cuDNN's autotune off where training would switch it on, to time what it gains.
"""
import argparse
import json

import engine.cli
from reproduction.schedule import run_in_slot


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calls", help="JSON file of [name, script, argv, log] lists")
    parser.add_argument("--no-cudnn-autotune", action="store_true", help="keep cuDNN's autotune off")
    args = parser.parse_args(argv)
    if args.no_cudnn_autotune:
        # before any stage script is imported, which binds the name
        engine.cli.training_backends = lambda device, deterministic: None
    with open(args.calls) as f:
        calls = json.load(f)
    for name, script, stage_argv, log in calls:
        ok, seconds, last = run_in_slot(script, stage_argv, log)
        print(json.dumps(dict(name=name, ok=ok, seconds=round(seconds, 3), last=last)), flush=True)


if __name__ == "__main__":
    main()
