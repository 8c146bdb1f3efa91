"""`lma` subcommands of the loadtest package (registered through the lma.commands entry point)."""

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add this package's subcommands (none yet)."""
