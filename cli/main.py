"""The ``funad`` command: extract -> fit -> eval, all meeting through files."""

from __future__ import annotations

import importlib

import click

from funad import __version__

from .common import setup_logging

# Each sub-command lives in its own module; (module, attribute) pairs.
_COMMANDS = [
    ("funad.cli.extract_cmd", "extract"),
    ("funad.cli.cache_cmd", "cache"),
    ("funad.cli.import_cmd", "import_features"),
    ("funad.cli.fit_cmd", "fit"),
    ("funad.cli.eval_cmd", "evaluate"),
    ("funad.cli.predict_cmd", "predict"),
    ("funad.cli.sweep_cmd", "sweep"),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="funad")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Fully unsupervised anomaly detection for images of parts.

    \b
    Typical use:
      funad extract DATA -o feats.zarr      # run the backbone once
      funad fit feats.zarr -o model/        # train on unlabelled, possibly dirty data
      funad eval model/ -o report/          # metrics and heatmaps from the cache
      funad predict model/ new/*.png -o out # score new images
    """
    setup_logging(verbose)


for _module, _attr in _COMMANDS:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:  # a stage not yet built in this checkout
        if _exc.name != _module:
            raise
        continue
    cli.add_command(getattr(_mod, _attr))


def main() -> None:
    cli(prog_name="funad")


if __name__ == "__main__":
    main()
