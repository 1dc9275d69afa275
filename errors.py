"""User-facing errors: one line naming the file or flag, never a traceback (SPEC section 9)."""
import argparse
import functools
import sys


class UserError(Exception):
    """Bad input the user can fix. The message names the file or flag and what to do."""


def problems_error(problems: list, where: str, shown: int = 20) -> UserError:
    """One error for several problems of one input: a single problem stays one line; several are
    listed one a line, the first `shown` of them and how many more."""
    if len(problems) == 1:
        return UserError(problems[0])
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return UserError(f"{where}: {len(problems)} problems; fix them and run again:\n  "
                     + "\n  ".join(problems[:shown]) + more)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other user error."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def exit_on_user_error(main):
    """Run `main`, turning a UserError into `error: <message>` on stderr and exit status 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: files already written are intact (a training run continues with --resume, "
                  "reproduce.py by running it again)", file=sys.stderr)
            sys.exit(130)
    return wrapper
