"""README.md is rendered from nbs/index.ipynb: the two must agree."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _render():
    spec = importlib.util.spec_from_file_location("readme_tool", ROOT / "tools" / "readme.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod.render()


def test_readme_matches_index():
    assert (ROOT / "README.md").read_text() == _render(), "run: python tools/readme.py"


def test_readme_has_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "python3 dev.py study" in text and "python3 dev.py test" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 dev.py test" in ci
