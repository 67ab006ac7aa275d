"""The `mlsp` command line: a thin click layer over the library functions.

Library code logs and raises :class:`mlsp.errors.MLSPError`; this module owns the console:
it sets up logging, turns MLSP errors into one-line messages with exit code 2, and prints
summaries.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from mlsp.errors import MLSPError  # noqa: E402

log = logging.getLogger("mlsp.cli")


def handle_errors(func):
    """Run a command, turning MLSP errors into a clear message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MLSPError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v: info from every module, -vv: debug).")
@click.version_option(package_name="mlsp")
def main(verbose):
    """mlsp: aesthetic quality (MOS 1-10) of photographs with MLSP features.

    \b
    The two stages:
      mlsp extract --images DIR --net irv2 --wide   once per dataset: images -> feature store
      mlsp train --head pool3fc                     many times: feature store -> trained head
    Then `mlsp evaluate`, `mlsp score`, `mlsp inspect`. `mlsp sample` builds a small dataset
    from photographs shipped with scikit-image, to try everything end to end.
    """
    level = logging.DEBUG if verbose >= 2 else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlsp").setLevel(level if verbose else logging.INFO)
    logging.getLogger("heads").setLevel(level if verbose else logging.INFO)
    logging.getLogger("mlsp.cli").setLevel(logging.INFO)


def echo_json(data):
    click.echo(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
