"""The documentation site builds offline with warnings as errors, and every tutorial's
code runs: the docs cannot rot.

A tutorial page (``docs/tutorials/*.md``) is executed top to bottom: its ```python
blocks in one shared namespace (like a notebook), its ```bash blocks with ``bash -e``,
in order, in a fresh working directory. A block opened as ```text or ```console is
output shown to the reader and is not run.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
TUTORIALS = sorted((DOCS / "tutorials").glob("[0-9]*.md"))
FENCE = re.compile(r"^```(python|bash)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

pytestmark = pytest.mark.docs


def blocks(page: Path):
    """The runnable code blocks of a page, in order: (language, code)."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text(encoding="utf-8"))]


def test_the_site_builds_without_warnings(tmp_path):
    run = subprocess.run([sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-b",
                          "html", "-q", str(DOCS), str(tmp_path / "html")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "html" / "index.html").is_file()


def test_there_are_tutorials_with_code():
    assert len(TUTORIALS) >= 1
    for page in TUTORIALS:
        assert blocks(page), f"{page.name} has no runnable code block"


_RUNNER = """
import subprocess, sys
namespace = {"__name__": "__main__"}
for i, (lang, code) in enumerate(BLOCKS):
    if lang == "python":
        exec(compile(code, f"{PAGE} block {i + 1}", "exec"), namespace)
    else:
        subprocess.run(["bash", "-e", "-c", code], check=True)
"""


def _marks(page: Path) -> list:
    """``mpi`` for a page that launches mpiexec, ``cuda`` for one that runs CUDA kernels."""
    code = blocks(page)
    marks = []
    if any(lang == "bash" and "mpiexec" in text for lang, text in code):
        marks.append(pytest.mark.mpi)
    if any(lang == "python" and "cuda" in text for lang, text in code):
        marks.append(pytest.mark.cuda)
    return marks


@pytest.mark.parametrize("page", [pytest.param(p, id=p.stem, marks=_marks(p)) for p in TUTORIALS])
def test_tutorial_runs(page, tmp_path):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg",
               NUMBA_ENABLE_CUDASIM="1")
    script = f"BLOCKS = {blocks(page)!r}\nPAGE = {page.name!r}\n" + _RUNNER
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{page.name} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
