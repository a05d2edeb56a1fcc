"""The package ships on its own: a wheel built from the repo installs and imports without nbdev."""
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = """
import sys, importlib.abc
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('nbdev', 'execnb', 'jupytext'): raise ImportError(f'{name} must not be needed')
sys.meta_path.insert(0, _Block())
import pkgutil, importlib, audiotl_nb
assert audiotl_nb.__file__.startswith(sys.prefix), audiotl_nb.__file__
mods = [m.name for m in pkgutil.walk_packages(audiotl_nb.__path__, 'audiotl_nb.')]
for m in mods: importlib.import_module(m)
print(len(mods), 'modules imported')
"""


def test_wheel_installs_and_imports_without_nbdev(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    whl = next((tmp_path / "dist").glob("audiotl_nb-*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    src_mods = {p.relative_to(ROOT).as_posix() for p in (ROOT / "audiotl_nb").rglob("*.py")}
    assert src_mods <= set(names), f"missing from wheel: {src_mods - set(names)}"
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("METADATA"))).decode()
    core_reqs = [l for l in meta.splitlines() if l.startswith("Requires-Dist:") and "extra ==" not in l]
    assert not any("nbdev" in l for l in core_reqs), core_reqs
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env)
    py = env / "bin" / "python"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(whl)], check=True)
    # dependencies come from the dev environment's site-packages, appended after the fresh venv's own
    site = sysconfig.get_paths()["purelib"]
    (Path(subprocess.check_output([py, "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"], text=True).strip())
     / "zz_deps.pth").write_text(site + "\n")
    out = subprocess.run([py, "-c", BLOCK], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "modules imported" in out.stdout
