"""What a user of a fresh clone meets: the README's Python examples run as printed, and
the validation and benchmark scripts write only where git does not look."""

import re
import subprocess
from pathlib import Path

import pytest

from ptoc.cli.claims import default_out

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_readme_example_runs_on_its_own(index, capsys):
    # each block in a fresh namespace: a block must define every name it uses
    exec(compile(BLOCKS[index], f"README.md python block {index + 1}", "exec"), {})


def _ignored(paths):
    """The paths among ``paths`` that git ignores in this checkout."""
    out = subprocess.run(["git", "check-ignore", "--no-index", *map(str, paths)], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert out.returncode in (0, 1), out.stderr
    return {Path(line) for line in out.stdout.splitlines()}


def test_validation_runs_write_only_ignored_folders():
    folder = Path("validation")
    outs = [default_out(folder, quick) / "claim.json" for quick in (False, True)]
    assert _ignored(outs) == set(outs)
    # and the committed records are not among them
    assert not _ignored([folder / "results" / "speedup.json"])


def test_benchmark_scripts_write_only_ignored_folders():
    scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    assert scripts
    for script in scripts:
        text = script.read_text(encoding="utf-8")
        found = re.findall(r'Path\(__file__\)(?:\.resolve\(\))?\.parent / "(\w+)"', text)
        assert found, f"{script.name}: no default output folder found"
        outs = [Path("benchmarks") / name / "record.json" for name in found]
        assert _ignored(outs) == set(outs), (script.name, found)
