"""What the tests of the ``flowpack`` command share: running it in-process."""

from __future__ import annotations

from pyro_flowpack.cli import main


def flowpack(argv, capsys):
    """Runs ``main(argv)`` (arguments turned into strings); returns the exit status,
    stdout and stderr."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit:  # argparse: --help, --version and argument errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line(err: str) -> bool:
    """Whether ``err`` is one line, without a traceback."""
    return err.count("\n") == 1 and "Traceback" not in err
