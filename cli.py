"""What every script's command line shares, torch-free (the tools import it without torch):
user errors as one line and exit status 2, argparse with the same behaviour, the checks of
flag values, and the one rule for path flags:

    a path you give is relative to the folder you run from; a default path is relative
    to the script's own folder (the repository root for train.py, AGW/ and DDAG/ for
    theirs), and datasets default to data/ under the repository root.
"""
import argparse
import atexit
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- errors
class UserError(Exception):
    """An error the user caused (bad path, flag, checkpoint ...).

    Scripts wrap their ``main`` with :func:`cli`, which turns this into ONE line on
    stderr and exit status 2 instead of a traceback.
    """


_PENDING_WARNINGS = []
_ON_FAILURE = []   # callbacks run when main fails (logger.StartGuard removes a run's outputs)


def warn(message):
    """A warning about the flags or the machine, printed with the run header rather than at
    once: a user error found later is then the only output, and the warning reaches the
    run's log. Scripts without a header print them at exit."""
    _PENDING_WARNINGS.append(f"warning: {message}")


def flush_warnings():
    for line in _PENDING_WARNINGS:
        print(line)
    _PENDING_WARNINGS.clear()


atexit.register(flush_warnings)


def on_failure(callback):
    """Have :func:`cli` call ``callback()`` if ``main`` fails in any way."""
    _ON_FAILURE.append(callback)


def _failed():
    for callback in _ON_FAILURE:
        callback()


def cli(main):
    """Run ``main()``; a :class:`UserError` becomes ``error: <message>`` and exit 2. On any
    failure, runs that had not finished an epoch leave no outputs (logger.StartGuard)."""
    try:
        return main()
    except UserError as e:
        _failed()
        _PENDING_WARNINGS.clear()   # the run never started: its warnings are moot
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _failed()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BaseException:
        _failed()
        raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value, bad choice) are ONE line
    ``error: ...`` and exit 2 through :func:`cli`, like every other user error, instead of
    a usage block. Help shows the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except None ones (their help says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


# ----------------------------------------------------------------------------- paths
def resolve_path(path, default=None, base=REPO_ROOT):
    """The path rule: ``path`` as given, relative to the current folder; when it is None or
    empty, ``default`` relative to ``base`` (the script's folder)."""
    if path:
        return Path(path).expanduser().resolve()
    return (Path(base) / default).resolve()


def check_writable(*folders):
    """Create each output folder and write/remove a probe file in it, so a wrong
    --model_path/--log_path fails before any training instead of at the first save."""
    for folder in folders:
        folder = Path(folder)
        probe = folder / f".write_test_{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"output folder {folder} is not writable ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- flag checks
def check_schedule(args):
    """The checks every trainer's lr schedule needs: a positive ``--lr``, and a warning
    when the warm-up is longer than the run (the lr would never reach ``--lr``)."""
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if args.warmup_epochs > args.epochs:
        warn(f"--warmup_epochs {args.warmup_epochs} > --epochs {args.epochs}: the lr never "
             f"reaches --lr {args.lr} (it stops at {args.lr * args.epochs / args.warmup_epochs:.3g})")


def check_stripes(num_stripe, img_h=None):
    """MMGL's K horizontal stripes: at least 2, of equal height (K divides the image height)."""
    if num_stripe < 2 or (img_h is not None and img_h % num_stripe):
        raise UserError(f"--num_stripe must be >= 2 and divide --img_h {img_h}, got {num_stripe}"
                        if img_h is not None else f"--num_stripe must be at least 2, got {num_stripe}")


def choice_check(name, value, choices):
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value
