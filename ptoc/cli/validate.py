"""``ptoc validate``: run the claim scripts of ``validation/`` and print one table.

The records, the discovery of the scripts and the running of one script are in
:mod:`ptoc.cli.claims`; this module is the command line around them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .arguments import Formatter
from .claims import (
    Verdict,
    default_out,
    discover,
    load_script,
    run_script,
    table,
    write_readme_table,
)
from .errors import CLIError

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Register the ``validate`` subcommand on the subparsers ``sub``."""
    v = sub.add_parser(
        "validate", help="check the papers' claims (validation/), print one table",
        description="Run the claim scripts in validation/ (one per claim of the papers) and "
        "print one table. Each writes a JSON record (claim, source, paper value, our value, "
        "tolerance, verdict) and its figures, by default to DIR/results/latest (or "
        "DIR/results/quick), which git ignores: the committed records in DIR/results "
        "change only with --out DIR/results. Exit code 1 when a claim fails.",
        formatter_class=Formatter)
    v.add_argument("--quick", action="store_true",
                   help="seconds per claim (the size tests/test_validation.py runs) instead "
                   "of the full runs")
    v.add_argument("--only", nargs="+", metavar="NAME", default=None,
                   help="run only these claims (script names, see --list)")
    v.add_argument("--list", action="store_true", help="list the claims and exit")
    v.add_argument("--readme", action="store_true",
                   help="regenerate the claims table of DIR/README.md from the committed "
                   "records DIR/results/*.json, and exit (runs no claim)")
    v.add_argument("--dir", type=Path, default=Path("validation"),
                   help="the folder of claim scripts")
    v.add_argument("--out", type=Path, default=None,
                   help="where records and figures go (default: DIR/results/latest, or "
                   "DIR/results/quick with --quick)")
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``ptoc validate``; return 1 when a claim fails, else 0."""
    try:
        scripts = discover(args.dir)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    if args.only:
        unknown = [n for n in args.only if n not in scripts]
        if unknown:
            raise CLIError(f"argument --only: no claim named {', '.join(map(repr, unknown))}; "
                           f"the claims are {', '.join(scripts)}")
        scripts = {n: scripts[n] for n in args.only}
    if args.readme:
        try:
            path = write_readme_table(args.dir)
        except (OSError, ValueError) as exc:
            raise CLIError(f"argument --readme: {exc}") from None
        print(f"wrote the claims table of {path}")
        return 0
    modules = {name: load_script(path) for name, path in scripts.items()}
    order = sorted(modules, key=lambda n: (modules[n].NUMBER, n))
    numbers = {n: modules[n].NUMBER for n in order}
    if args.list:
        for n in order:
            print(f"{numbers[n]:>3}  {n:<28} {modules[n].CLAIM}")
        return 0
    out = args.out or default_out(args.dir, args.quick)
    records = []
    for n in order:
        print(f"[{numbers[n]}] {n} ...", end=" ", flush=True)
        record = run_script(modules[n], n, quick=args.quick, out_dir=out)
        print(f"{record.verdict.value} ({record.seconds:.1f} s)", flush=True)
        records.append(record)
    print()
    print(table(records, numbers))
    print(f"\nrecords in {out}{'/'}")
    return 1 if any(r.verdict is Verdict.FAIL for r in records) else 0
