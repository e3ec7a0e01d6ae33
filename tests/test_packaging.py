"""The user-requested folders install under `funad`, never at the top level."""

import importlib
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_only_funad_is_a_top_level_package():
    top = importlib.metadata.distribution("funad").read_text("top_level.txt").split()
    assert top == ["funad"]


@pytest.mark.parametrize("name, folder", [("funad.cache", "cache"), ("funad.pipelines", "pipelines"),
                                          ("funad.cli", "cli")])
def test_subpackages_map_to_repository_folders(name, folder):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == ROOT / folder


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("funad") == "funad.cli.main:main"
