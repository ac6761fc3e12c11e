"""The claims runner behind ``ptoc validate``: validation records, discovery and running.

The folder ``validation/`` of the repository holds one script per claim of the papers
behind ptoc. A script is a module that defines

``NUMBER`` (int)
    The claim's number in ``validation/README.md`` (the order of the table).
``CLAIM`` (str)
    The claim, in one sentence.
``SOURCE`` (str)
    Paper, and equation, theorem or section where known.
``run(quick: bool, out_dir: pathlib.Path) -> Record``
    Checks the claim (``quick``: in seconds, for CI; otherwise the full run) and returns
    its :class:`Record`; figures go into ``out_dir``.

and ends with ``if __name__ == "__main__": raise SystemExit(script_main(__name__))`` so
that ``python validation/<name>.py [--quick]`` runs it alone. ``ptoc validate [--quick]
[--only NAME ...]`` runs them all (or the named ones), writes every record to
``<out>/<name>.json`` and prints one table.

Scripts may import helper modules ``_*.py`` of their folder (which are not claims).

A claim that does not hold is reported as ``fail`` with its numbers; nothing is
loosened or hidden. ``skipped`` is only for a check that cannot run here (an optional
dependency missing), with the reason.
"""

from __future__ import annotations

import argparse
import enum
import importlib.util
import json
import math
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "Record",
    "readme_table",
    "write_readme_table",
    "Verdict",
    "discover",
    "load_script",
    "run_script",
    "script_main",
    "table",
]


class Verdict(str, enum.Enum):
    """Outcome of a claim's check."""

    PASS = "pass"
    FAIL = "fail"
    SKIPPED = "skipped"


def _plain(obj: Any) -> Any:
    """JSON-ready copy: NumPy scalars and arrays to numbers and lists, NaN/inf to strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else repr(value)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass
class Record:
    """What one claim's check found.

    Attributes
    ----------
    name : str
        The script's name (file name without ``.py``); set by the runner.
    claim, source : str
        As the script's ``CLAIM`` and ``SOURCE``; set by the runner when empty.
    verdict : Verdict
        ``pass`` when every part of the claim held within its tolerance, ``fail``
        otherwise, ``skipped`` when the check could not run (``reason`` says why).
    our_value : object
        The measured quantity (a number, or a dict of them).
    paper_value : object, optional
        The paper's figure, when it gives one.
    tolerance : object, optional
        What "holds" means here (e.g. ``"<= 1e-10 relative"``).
    details : dict
        Further numbers: per-case tables, histories.
    figures : list of str
        File names of the PNGs written into the output folder.
    reason : str, optional
        Why the check was skipped, or a one-line account of a failure.
    mode : str
        ``"quick"`` or ``"full"``; set by the runner.
    seconds : float
        Wall time of the check; set by the runner.
    """

    verdict: Verdict
    our_value: Any
    paper_value: Any = None
    tolerance: Any = None
    details: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    reason: str | None = None
    name: str = ""
    claim: str = ""
    source: str = ""
    mode: str = ""
    seconds: float = math.nan

    def __post_init__(self) -> None:
        self.verdict = Verdict(self.verdict)

    @classmethod
    def from_checks(cls, checks: dict[str, bool], our_value: Any, **kw: Any) -> Record:
        """``pass`` when every named check holds; the failing ones go into ``reason``."""
        failed = [name for name, ok in checks.items() if not ok]
        reason = kw.pop("reason", None)
        if failed and reason is None:
            reason = "does not hold: " + ", ".join(failed)
        details = dict(kw.pop("details", {}))
        details["checks"] = {k: bool(v) for k, v in checks.items()}
        return cls(Verdict.FAIL if failed else Verdict.PASS, our_value, details=details,
                   reason=reason, **kw)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def save(self, out_dir: Path) -> Path:
        """Write ``<out_dir>/<name>.json`` atomically (:func:`ptoc.io.atomic_write_text`)."""
        from ..io import atomic_write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(out_dir / f"{self.name}.json",
                                 json.dumps(self.to_dict(), indent=1) + "\n")


def default_out(folder: Path, quick: bool) -> Path:
    """Where a run writes its records unless told otherwise: ``<folder>/results/quick``
    or ``<folder>/results/latest``, both ignored by git. The committed records in
    ``<folder>/results`` change only when asked for (``--out <folder>/results``)."""
    return folder / "results" / ("quick" if quick else "latest")


def discover(folder: Path) -> dict[str, Path]:
    """The claim scripts in ``folder``: every ``*.py`` not starting with ``_``, by name."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no validation folder at {str(folder)!r}: run 'ptoc validate' from a clone of "
            "the repository (it holds validation/), or give --dir")
    return {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}


def load_script(path: Path) -> ModuleType:
    """Import a claim script by path and check that it defines what the runner needs."""
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:  # the scripts share helper modules ``_*.py`` of their folder
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"ptoc_validation_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = [a for a in ("NUMBER", "CLAIM", "SOURCE", "run") if not hasattr(module, a)]
    if missing:
        raise AttributeError(f"validation script {path.name} lacks {', '.join(missing)}")
    return module


def run_script(module: ModuleType, name: str, *, quick: bool, out_dir: Path) -> Record:
    """Run one script's check; an exception becomes a ``fail`` record with its traceback."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        record = module.run(quick=quick, out_dir=out_dir)
        if not isinstance(record, Record):
            raise TypeError(f"run() returned {type(record).__name__}, not a Record")
    except Exception as exc:  # a crash is reported as a failed claim, with the cause
        record = Record(Verdict.FAIL, None, reason=f"the check raised {type(exc).__name__}: "
                        f"{exc}", details={"traceback": traceback.format_exc()})
    record.name = name
    record.claim = record.claim or module.CLAIM
    record.source = record.source or module.SOURCE
    record.mode = "quick" if quick else "full"
    record.seconds = time.perf_counter() - t0
    record.save(out_dir)
    return record


def _short(value: Any, width: int = 38) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3g}"
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={_short(v, 12)}" for k, v in value.items())
    else:
        text = str(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def table(records: Sequence[Record], numbers: dict[str, int]) -> str:
    """One line per claim: number, name, verdict, our value, paper value, time."""
    rows = [("#", "claim", "verdict", "ours", "paper", "s")]
    for r in records:
        rows.append((str(numbers.get(r.name, "")), r.name, r.verdict.value.upper(),
                     _short(r.our_value), _short(r.paper_value, 24), f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in records:
        if r.verdict is not Verdict.PASS and r.reason:
            lines.append(f"{r.name}: {r.verdict.value}: {r.reason}")
    return "\n".join(lines)


#: The lines around the generated table of ``validation/README.md``.
README_BEGIN = ("<!-- The table below is generated from the committed records results/*.json "
                "by 'ptoc validate --readme'; do not edit it by hand. -->")
README_END = "<!-- end of the generated table -->"


def _markdown_cell(value: Any) -> str:
    """A record value as one markdown table cell: dicts as ``key: value; ...``, floats
    to four significant digits, ``|`` escaped, ``-`` for None."""
    def text(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, dict):
            return "; ".join(f"{k}: {text(x)}" for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(text(x) for x in v) + "]"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) and v != 0 else str(v)
        return str(v)

    return " ".join(text(value).split()).replace("|", "\\|")


def _script_number(script: Path) -> int | None:
    """The literal ``NUMBER`` of a claim script, read without importing it."""
    import ast

    if not script.is_file():
        return None
    for node in ast.parse(script.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "NUMBER" for t in node.targets):
            value = ast.literal_eval(node.value)
            return value if isinstance(value, int) else None
    return None


def readme_table(folder: Path) -> str:
    """The table of ``<folder>/README.md``: one row per committed full-mode record
    ``<folder>/results/<name>.json`` of a claim script ``<folder>/<name>.py``, in the
    order of the scripts' ``NUMBER``: number, claim and script, source, verdict, our
    value, the paper's value and the tolerance (the reason, for a claim that failed)."""
    rows = []
    for path in sorted((folder / "results").glob("*.json")):
        number = _script_number(folder / f"{path.stem}.py")
        if number is None:
            continue
        r = json.loads(path.read_text(encoding="utf-8"))
        verdict = str(r.get("verdict", "")).lower()
        shown = verdict if verdict == "pass" else f"**{verdict}**"
        ours = _markdown_cell(r.get("our_value"))
        if verdict != "pass" and r.get("reason"):
            ours += f" ({_markdown_cell(r['reason'])})"
        rows.append((number, f"| {number} | {_markdown_cell(r.get('claim'))} (`{path.stem}`) | "
                     f"{_markdown_cell(r.get('source'))} | {shown} | {ours} | "
                     f"{_markdown_cell(r.get('paper_value'))} | "
                     f"{_markdown_cell(r.get('tolerance'))} |"))
    head = ["| # | claim (script) | source | verdict | ours (full mode) | paper | tolerance |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    return "\n".join(head + [row for _, row in sorted(rows)])


def write_readme_table(folder: Path) -> Path:
    """Replace the generated table of ``<folder>/README.md`` (between
    :data:`README_BEGIN` and :data:`README_END`) by :func:`readme_table`, atomically."""
    from ..io import atomic_write_text

    path = folder / "README.md"
    text = path.read_text(encoding="utf-8")
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{str(path)!r} has no generated table (the marker lines "
                         f"{README_BEGIN!r} and {README_END!r})")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return atomic_write_text(path, f"{head}{README_BEGIN}\n\n{readme_table(folder)}\n\n"
                                   f"{README_END}{tail}")


def script_main(module_name: str, argv: Sequence[str] | None = None) -> int:
    """``python validation/<name>.py [--quick] [--out DIR]``: run one claim and print it."""
    module = sys.modules[module_name]
    path = Path(module.__file__)
    parser = argparse.ArgumentParser(description=f"claim {module.NUMBER}: {module.CLAIM}")
    parser.add_argument("--quick", action="store_true", help="the seconds-long CI check")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the record and figures go (default: "
                        "validation/results/latest, or validation/results/quick with "
                        "--quick; --out validation/results updates the committed records)")
    args = parser.parse_args(argv)
    out = args.out or default_out(path.parent, args.quick)
    record = run_script(module, path.stem, quick=args.quick, out_dir=out)
    print(table([record], {path.stem: module.NUMBER}))
    print(f"wrote {out / (path.stem + '.json')}")
    return 0 if record.verdict is not Verdict.FAIL else 1
