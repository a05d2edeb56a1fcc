"""Execute notebooks in place so that the docs show real outputs, then clean and export them.

    .venv/bin/python tools/run_nb.py nbs/00_core.ipynb [more.ipynb ...]
"""
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(path: Path, timeout: int = 1800):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    subprocess.run([BIN / "nbdev-clean", "--fname", str(path)], check=True, cwd=ROOT)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print("running", p, flush=True)
        run(Path(p).resolve())
    subprocess.run([BIN / "nbdev-export"], check=True, cwd=ROOT)
