"""`python -m mailbridge` and the `mailbridge` script (both processes of the daemon).

The SIGTERM handler goes in before anything heavy is imported (stopsignal.py):
a stop during start-up is a clean stop, not a death by signal.
"""

from mailbridge import stopsignal


def main() -> int:
    stopsignal.install()
    from mailbridge.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
