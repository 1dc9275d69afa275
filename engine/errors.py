"""User-facing errors: one line naming the file or flag, never a traceback (SPEC section 9)."""
import functools
import sys


class UserError(Exception):
    """Bad input the user can fix. The message names the file or flag and what to do."""


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
            print("interrupted: the last checkpoint is intact; rerun with --resume", file=sys.stderr)
            sys.exit(130)
    return wrapper
