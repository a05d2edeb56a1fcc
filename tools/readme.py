"""Render README.md from nbs/index.ipynb (nbdev-readme needs Quarto, which these machines lack).

    python tools/readme.py          # rewrite README.md
    python tools/readme.py --check  # exit 1 if README.md is out of date
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(nb_path=ROOT / "nbs" / "index.ipynb") -> str:
    nb = json.loads(Path(nb_path).read_text())
    parts = []
    for c in nb["cells"]:
        src = "".join(c["source"]).strip()
        if not src or src.startswith("#| hide"): continue
        if c["cell_type"] == "markdown": parts.append(src)
        elif c["cell_type"] == "code":
            parts.append(f"```python\n{src}\n```")
            outs = []
            for o in c.get("outputs", []):
                if o.get("output_type") == "stream": outs.append("".join(o["text"]))
                elif "text/plain" in o.get("data", {}) and "image/png" not in o.get("data", {}):
                    outs.append("".join(o["data"]["text/plain"]))
            if outs: parts.append("```\n" + "".join(outs).rstrip() + "\n```")
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    text, readme = render(), ROOT / "README.md"
    if "--check" in sys.argv:
        sys.exit(0 if readme.exists() and readme.read_text() == text else "README.md is out of date: run python tools/readme.py")
    readme.write_text(text)
