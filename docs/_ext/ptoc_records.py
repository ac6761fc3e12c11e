"""Sphinx extension: tables and figures of ptoc's committed records, made at build time.

The validation page and the benchmarks page must never go stale, so they do not copy
numbers by hand: these directives read the JSON records the scripts write and turn
them into tables (MyST markdown, parsed in place), offline.

``{ptoc-validation-table}``
    One row per claim record ``validation/results/<name>.json`` (full mode; the
    untracked ``results/quick/`` is ignored), ordered by the script's ``NUMBER``:
    number, name, claim, source, verdict, our value, paper value, tolerance.
``{ptoc-validation-figures}``
    Per claim, in the same order, its figures ``validation/results/<figure>.png`` with
    a caption (number, name, verdict, claim, and the reason of a failure).
``{ptoc-benchmark} KIND``
    The newest record ``benchmarks/results/KIND_<timestamp>.json`` (or the one named
    by ``:record:``) of ``gradient``, ``pymgrit``, ``scaling``, ``simultaneous``,
    ``discrete`` or ``node``: the machine, the settings, the measured table(s) and, if
    it exists, the PNG with the same stem.

Images outside the source folder: a figure's path is written relative to the page
(``../validation/results/x.png``); Sphinx resolves it and copies the file into the
build's ``_images/``.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective

REPO = Path(__file__).resolve().parents[2]
VALIDATION = REPO / "validation"
VALIDATION_RESULTS = VALIDATION / "results"
BENCH_RESULTS = REPO / "benchmarks" / "results"

_STYLE = """<style>
table.ptoc-records { font-size: 0.82em; display: block; overflow-x: auto; }
table.ptoc-records td, table.ptoc-records th { vertical-align: top; padding: 0.2em 0.4em; }
table.ptoc-records td ul { margin: 0 0 0 1em; padding: 0; }
table.ptoc-records p { margin: 0; }
</style>"""


# --- formatting ------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#+!|$~^%])")
_CODE_SPAN = re.compile(r"(`[^`]+`)")


def esc(text: Any) -> str:
    """Plain text for MyST markdown: markdown-special characters escaped, except in
    balanced backtick code spans, which stay code."""
    text = " ".join(str(text).split())
    if text.count("`") % 2:
        return _MD_SPECIAL.sub(r"\\\1", text)
    return "".join(part if _CODE_SPAN.fullmatch(part) else _MD_SPECIAL.sub(r"\\\1", part)
                   for part in _CODE_SPAN.split(text))


def num(value: Any, digits: int = 4) -> str:
    """A number as text: integers as they are, floats to ``digits`` significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        return f"{value:.{digits}g}"
    return str(value)


def plain(value: Any) -> str:
    """A record value as one line of escaped text (lists and dicts flattened)."""
    if value is None:
        return "–"
    if isinstance(value, dict):
        return "; ".join(f"{esc(k)}: {plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(plain(v) for v in value) + "]"
    if isinstance(value, (int, float)):
        return esc(num(value))
    return esc(value)


def cell(value: Any) -> list[str]:
    """The lines of a list-table cell: a dict becomes a bullet list, one key a line."""
    if isinstance(value, dict) and len(value) > 1:
        return [f"* {esc(k)}: {plain(v)}" for k, v in value.items()]
    return [plain(value)]


def list_table(header: list[str], rows: list[list[Any]], widths: list[int] | None = None,
               caption: str = "") -> list[str]:
    """A MyST ``list-table``; a row entry is a value (see :func:`cell`) or raw markdown
    given as ``("md", text)``."""
    out = [f"```{{list-table}} {caption}".rstrip(), ":header-rows: 1", ":class: ptoc-records"]
    if widths:
        out.append(":widths: " + " ".join(map(str, widths)))
    out.append("")
    for row in [[("md", esc(h)) for h in header]] + rows:
        for c, entry in enumerate(row):
            is_md = isinstance(entry, tuple) and len(entry) == 2 and entry[0] == "md"
            lines = [entry[1]] if is_md else cell(entry)
            out.append(("* - " if c == 0 else "  - ") + lines[0])
            out.extend("    " + line for line in lines[1:])
    out.append("```")
    return out


def sentence(text: str) -> str:
    """``text`` with its first letter capitalised."""
    return text[:1].upper() + text[1:]


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def ms(seconds: float) -> str:
    v = 1e3 * seconds
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def relpath_from_doc(env, target: Path) -> str:
    """``target`` relative to the folder of the page being read (forward slashes)."""
    doc_dir = Path(env.doc2path(env.docname)).parent
    return Path(os.path.relpath(target, doc_dir)).as_posix()


def repo_path(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --- base directive --------------------------------------------------------------------------

class _MarkdownDirective(SphinxDirective):
    """A directive that writes MyST markdown and parses it in place (MyST pages only)."""

    has_content = False

    def markdown(self) -> list[str]:
        raise NotImplementedError

    def run(self) -> list[nodes.Node]:
        if not hasattr(self.state, "_renderer"):  # the MockState of myst-parser
            raise self.error(f"{self.name} writes MyST markdown: use it in a .md page")
        lines = self.markdown()
        container = nodes.container(classes=["ptoc-records-block"])
        self.state.nested_parse(StringList(lines, source=self.env.docname), 0, container)
        out = list(container.children)
        if not self.env.temp_data.get("ptoc_records_style"):  # once per page
            self.env.temp_data["ptoc_records_style"] = True
            out.insert(0, nodes.raw("", _STYLE, format="html"))
        return out

    def load(self, path: Path) -> dict[str, Any]:
        self.env.note_dependency(str(path))
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ExtensionError(f"cannot read the record {path}: {exc}") from exc


# --- validation ------------------------------------------------------------------------------

def script_constant(script: Path, name: str) -> Any:
    """The literal module constant ``name`` of a claim script, read without importing it."""
    if not script.is_file():
        return None
    tree = ast.parse(script.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return None
    return None


def claim_number(name: str) -> int | None:
    """``NUMBER`` of ``validation/<name>.py``."""
    value = script_constant(VALIDATION / f"{name}.py", "NUMBER")
    return value if isinstance(value, int) else None


def validation_records(directive: SphinxDirective) -> list[tuple[int | None, dict[str, Any]]]:
    paths = sorted(VALIDATION_RESULTS.glob("*.json"))
    if not paths:
        raise ExtensionError(f"no validation records in {VALIDATION_RESULTS}")
    records = []
    for path in paths:
        rec = directive.load(path)
        name = rec.get("name") or path.stem
        rec["name"] = name
        script = VALIDATION / f"{name}.py"
        if script.is_file():
            directive.env.note_dependency(str(script))
        records.append((claim_number(name), rec))
    # a claim script without a committed record is listed, not hidden
    have = {rec["name"] for _, rec in records}
    for script in sorted(VALIDATION.glob("*.py")):
        if script.name.startswith("_") or script.stem in have:
            continue
        number = claim_number(script.stem)
        if number is None:
            continue
        directive.env.note_dependency(str(script))
        records.append((number, {"name": script.stem, "verdict": "no record",
                                 "claim": script_constant(script, "CLAIM"),
                                 "source": script_constant(script, "SOURCE")}))
    records.sort(key=lambda nr: (nr[0] is None, nr[0] or 0, nr[1]["name"]))
    return records


def verdict_md(verdict: str) -> str:
    return {"pass": "pass", "fail": "**fail**", "skipped": "*skipped*",
            "no record": "*no record committed*"}.get(verdict, esc(verdict))


def figure_label(name: str) -> str:
    return f"validation-figure-{name}"


class ValidationTable(_MarkdownDirective):
    """The table of every claim record."""

    def markdown(self) -> list[str]:
        records = validation_records(self)
        rows = []
        for number, rec in records:
            name = rec["name"]
            link = (f"{{ref}}`{name} <{figure_label(name)}>`" if rec.get("figures")
                    else f"`{name}`")
            rows.append([("md", esc(number if number is not None else "")), ("md", link),
                         rec.get("claim"), rec.get("source"),
                         ("md", verdict_md(rec.get("verdict", ""))), rec.get("our_value"),
                         rec.get("paper_value"), rec.get("tolerance")])
        lines = list_table(["#", "name", "claim", "source", "verdict", "our value",
                            "paper value", "tolerance"], rows,
                           widths=[2, 8, 18, 14, 5, 20, 13, 20])
        modes = sorted({rec["mode"] for _, rec in records if rec.get("mode")})
        total = sum(float(rec.get("seconds") or 0) for _, rec in records)
        count = {v: [rec["name"] for _, rec in records if rec.get("verdict") == v]
                 for v in ("pass", "fail", "skipped", "no record")}
        parts = [f"{len(names)} {verdict}" + (" (" + ", ".join(f"`{n}`" for n in names) + ")"
                                              if verdict != "pass" else "")
                 for verdict, names in count.items() if names]
        lines += ["", f"{len(rows)} claims: {'; '.join(parts)}. Records: "
                  f"`{repo_path(VALIDATION_RESULTS)}/*.json` ("
                  f"{', '.join(map(esc, modes))} mode); the checks took "
                  f"{total / 60:.0f} minutes in all."]
        missing = count["no record"]
        if missing:
            lines += ["", "No record is committed for "
                      + ", ".join(f"`{n}`" for n in missing) + ": run `ptoc validate "
                      "--only " + " ".join(missing) + "` to make one."]
        return lines


class ValidationFigures(_MarkdownDirective):
    """Every claim's figures, with captions."""

    def markdown(self) -> list[str]:
        lines: list[str] = []
        for number, rec in validation_records(self):
            name = rec["name"]
            figures = rec.get("figures") or []
            for k, fig in enumerate(figures):
                path = VALIDATION_RESULTS / fig
                if not path.is_file():
                    raise ExtensionError(f"record {name} names the figure {fig}, which is "
                                         f"not in {VALIDATION_RESULTS}")
                caption = (f"**Claim {esc(number)}, `{name}`: {verdict_md(rec['verdict'])}.** "
                           f"{esc(sentence(rec.get('claim', '')))}. Source: "
                           f"{esc(rec.get('source', ''))}.")
                if rec.get("verdict") != "pass" and rec.get("reason"):
                    caption += f" Recorded reason: {esc(rec['reason'])}."
                caption += (f" Rerun: `ptoc validate --only {name}`; record "
                            f"`{repo_path(VALIDATION_RESULTS / (name + '.json'))}`.")
                lines += [f"```{{figure}} {relpath_from_doc(self.env, path)}"]
                if k == 0:
                    lines.append(f":name: {figure_label(name)}")
                lines += [":width: 100%", f":alt: figure of validation claim {name}", "",
                          caption, "```", ""]
        return lines


# --- benchmarks ------------------------------------------------------------------------------

def machine_md(rec: dict[str, Any]) -> str:
    m = dict(rec.get("machine") or {})
    parts = []
    if "cpu_model" in m:
        cpu = m["cpu_model"]
        if m.get("logical_cpus"):
            cpu += f", {m['logical_cpus']} logical CPUs"
        if m.get("cpu_mhz"):
            cpu += f" at {float(m['cpu_mhz']) / 1e3:.2f} GHz"
        if m.get("simd"):
            cpu += " (" + ", ".join(m["simd"]) + ")"
        parts.append(esc(cpu))
    if m.get("platform"):
        parts.append(esc(m["platform"]))
    versions = [f"{k} {m[k]}" for k in ("python", "numpy", "numba", "torch", "pymgrit",
                                        "mpi4py", "mpich", "ptoc") if m.get(k)]
    if versions:
        parts.append(esc(", ".join(versions)))
    threads = [f"{k}={m[k]}" for k in ("threads", "numba_threads", "numba_threading_layer",
                                       "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT")
               if m.get(k) is not None]
    if threads:
        parts.append(esc(", ".join(threads)))
    commit = m.get("git_commit") or rec.get("git_commit")
    if commit:
        parts.append(f"ptoc commit `{commit[:10]}`")
    return "; ".join(parts)


def record_header(rec: dict[str, Any], path: Path) -> list[str]:
    date = rec.get("date", "")
    head = f"Record `{repo_path(path)}`" + (f" ({esc(date.replace('T', ' '))})" if date else "")
    lines = [f"{head}. Machine: {machine_md(rec)}."]
    elapsed = rec.get("elapsed_s")
    if elapsed:
        elapsed = float(elapsed)
        lines[0] += (f" The run took {elapsed / 60:.1f} minutes." if elapsed >= 60 else
                     f" The run took {elapsed:.1f} s.")
    return lines + [""]


def figure_md(directive: SphinxDirective, path: Path, caption: str) -> list[str]:
    png = path.with_suffix(".png")
    if not png.is_file():
        return []
    directive.env.note_dependency(str(png))
    return [f"```{{figure}} {relpath_from_doc(directive.env, png)}", ":width: 100%",
            f":alt: {esc(caption)}", "", f"{caption} (`{repo_path(png)}`)", "```", ""]


def bench_gradient(rec, directive, path) -> list[str]:
    peak = rec.get("peak", {})
    lines = record_header(rec, path)
    lines += [f"Level `{rec.get('level')}`, activation {esc(rec.get('activation'))}, "
              f"{esc(rec.get('dtype'))}; statistic: {esc(rec['settings'].get('statistic'))} "
              f"of interleaved repeats ({rec['settings'].get('min_repeats')}–"
              f"{rec['settings'].get('max_repeats')} per cell, about "
              f"{num(rec['settings'].get('budget_s'))} s of timing per cell). "
              f"GFLOP/s count {esc(rec.get('flop_count'))}; the peak "
              f"{num(peak.get('gflops'))} GFLOP/s assumes {esc(peak.get('assumption'))}.", ""]
    rows = []
    for c in rec["cells"]:
        med = c["median_s"]
        gf = c.get("gflops", {})
        diff = max(c.get("max_rel_diff", {}).values(), default=float("nan"))
        rows.append([c["d"], c["S"], c["N"], ms(med["numpy"]), ms(med["cpu"]),
                     ms(med["torch"]) if "torch" in med else "–",
                     f"{c['speedup_cpu_vs_torch']:.2f}×" if "speedup_cpu_vs_torch" in c else "–",
                     f"{c['speedup_cpu_vs_numpy']:.1f}×",
                     f"{gf.get('cpu', float('nan')):.1f}",
                     f"{100 * gf.get('cpu', float('nan')) / peak['gflops']:.0f}%"
                     if peak.get("gflops") else "–",
                     f"{diff:.1e}"])
    lines += list_table(["d", "S", "N", "NumPy ms", "Numba CPU ms", "PyTorch ms",
                         "PyTorch / Numba", "NumPy / Numba", "Numba GFLOP/s", "% of peak",
                         "max rel. diff vs PyTorch"], rows,
                        caption="Serial gradient (forward + adjoint sweep), medians")
    if rec.get("targets"):
        lines += [""] + [f"* {esc(t)}" for t in rec["targets"]]
    return lines + [""]


def bench_pymgrit(rec, directive, path) -> list[str]:
    p, s = rec["problem"], rec["settings"]
    lines = record_header(rec, path)
    lines += [f"Problem: width d = {p['width']}, batch S = {p['batch']}, depth N = "
              f"{p['depth']}, T = {num(p['T'])}, {esc(p['activation'])}, {esc(p['dtype'])}; "
              f"K_n ~ {esc(p['K'])}, b_n ~ {esc(p['b'])}, X_0 ~ {esc(p['X0'])}, seed "
              f"{p['seed']}. Both libraries: coarsening m = {s['coarsening']}, "
              f"{esc(s['relaxation'])} relaxation, {esc(s['cycle'])}-cycles, absolute "
              f"tolerance {num(s['tol'])}, no nested iteration, {s['repeats']} interleaved "
              f"rounds; {esc(s['statistic'])}.", ""]
    res = rec["results"]
    loop = res.get("numpy loop", {}).get("median")
    rows = []
    for label, r in res.items():
        meta = r.get("meta", {})
        ratio = r.get("ratio_pymgrit_solve_median")
        per_step = r["median"] / r["steps_total"] * 1e6 if r.get("steps_total") else None
        rows.append([label, meta.get("threads", "–"), r.get("levels") or "–",
                     r.get("iterations", "–"),
                     f"{r['residuals'][-1]:.2e}" if r.get("residuals") else "–",
                     ms(r["median"]), ms(r["min"]),
                     f"{ratio:.1f}×" if ratio else "–",
                     f"{r['median'] / loop:.1f}×" if loop else "–",
                     r.get("steps_total", "–"),
                     f"{per_step:.2f}" if per_step else "–",
                     f"{r['max_diff_all_vs_serial']:.1e}"
                     if r.get("max_diff_all_vs_serial") is not None else "–"])
    lines += list_table(["implementation", "threads", "levels", "iterations",
                         "final residual", "median ms", "min ms", "PyMGRIT / ptoc",
                         "time / NumPy loop", "layer steps", "µs per step",
                         "max diff. from the serial states"], rows,
                        caption="Forward sweep, one process")
    lines.append("")
    lines += [f"* {esc(t)}" for t in rec.get("summary", [])]
    # what the target would take, per configuration, from the same record (older records
    # were made against a 30x target and carry no floor)
    target = 30.0 if "floor" not in rec else 20.0
    floor = rec.get("floor")
    for cfg in s["configs"]:
        label = cfg["label"]
        pym = res.get(f"PyMGRIT {label}")
        ours = [r for k, r in res.items() if k.startswith(f"ptoc MGRIT {label}")]
        if not pym or not ours:
            continue
        best = min(ours, key=lambda r: r["median"])
        need = pym["median"] / target
        lines.append(f"* {esc(label)}: {target:g}× needs ptoc ≤ {ms(need)} ms, i.e. "
                     f"{need / best['steps_total'] * 1e6:.2f} µs per layer step for its "
                     f"{best['steps_total']} steps; measured {ms(best['median'])} ms = "
                     f"{best['median'] / best['steps_total'] * 1e6:.2f} µs per step with "
                     f"{best['meta'].get('threads')} thread(s).")
    if floor:
        lines.append(f"* Floor of one layer step on one thread, measured in the same run: "
                     f"the product {floor['product_ns']:.0f} ns + the activation "
                     f"{floor['activation_ns']:.0f} ns = {floor['step_us']:.2f} µs; on one "
                     "core no MGRIT of these steps can beat PyMGRIT by more than "
                     + ", ".join(f"{r['floor_ratio_bound']:.1f}× ({esc(r['meta']['config'])})"
                                 for r in res.values() if "floor_ratio_bound" in r) + ".")
    return lines + [""]


def bench_scaling(rec, directive, path) -> list[str]:
    s = rec["settings"]
    lines = record_header(rec, path)
    lines += [f"Depths N = {', '.join(map(str, s['depths']))}; MGRIT "
              f"`{s['mgrit']}`, parareal {esc(s['parareal'])}; tolerance {num(s['tol'])}; "
              f"{s['launches']} launches × {s['repeats_per_launch']} timed rounds per "
              f"configuration, medians. Timed: {esc(rec.get('timed', ''))}.", "",
              f"Prediction: {esc(rec.get('prediction', ''))}.", ""]
    configs = [c["label"] for c in s["launch_configs"]]
    ranks = [str(p) for p in [1, 2] + list(s["sim_ranks"])]
    for sweep, analysis in rec["analysis"].items():
        rows = []
        for N, methods in analysis.items():
            for method, a in methods.items():
                if not isinstance(a, dict):
                    continue
                row = [int(N), method]
                row += [ms(a["measured_s"][c]) for c in configs]
                row.append(f"{a['measured_speedup'].get(configs[-1], float('nan')):.2f}")
                row += [f"{a['predicted_speedup'][p]:.2f}" if p in a["predicted_speedup"]
                        else "–" for p in ranks]
                rows.append(row)
        lines += list_table(["N", "method"] + [f"ms, {c}" for c in configs]
                            + [f"measured speed-up, {configs[-1]}"]
                            + [f"predicted, P={p}" for p in ranks], rows,
                            caption=f"{sweep.capitalize()}: measured times and speed-ups "
                            "over the serial sweep on 1 rank × 1 thread")
        lines.append("")
        rows = []
        for N, methods in analysis.items():
            for method, a in methods.items():
                if not isinstance(a, dict) or method == "serial":
                    continue
                cp, it = a["critical_path"], a["iterations"]
                rows.append([int(N), method]
                            + [sum(cp[p].values()) if p in cp else "–" for p in ranks]
                            + ["/".join(str(v) for v in it[ranks[-1]].values())
                               if ranks[-1] in it else "–"])
        lines += list_table(["N", "method"] + [f"P={p}" for p in ranks]
                            + [f"iterations at P={ranks[-1]}"
                               + (" (forward/adjoint)" if sweep == "gradient" else "")], rows,
                            caption=f"{sweep.capitalize()}: layer steps on the critical path "
                            "(simulated ranks; the serial sweep: "
                            + ("2N" if sweep == "gradient" else "N") + ")")
        lines.append("")
    lines += figure_md(directive, path, "Predicted speed-up against P for each depth, "
                       "measured points at P = 1, 2")
    return lines


def bench_simultaneous(rec, directive, path) -> list[str]:
    s = rec["settings"]
    report = [k for k in s["report"] if k <= s["steps"]]
    lines = record_header(rec, path)
    lines += [f"Network {esc(s['network'])} on {esc(s['data'])} ({s['n_train']} training, "
              f"{s['n_val']} validation points), full-batch L-BFGS, {s['steps']} steps, seed "
              f"{s['seed']}; simultaneous runs take {s['mgrit_iterations']} MGRIT iterations "
              f"per sweep and gradient evaluation; every {s['exact_every']} evaluations the "
              "distance to the exact gradient is recorded.", ""]
    runs = rec["runs"]
    base = sum(runs[0]["critical_per_eval"])
    rows = []
    for r in runs:
        crit = sum(r["critical_per_eval"])
        errs = sorted(r.get("grad_errors") or [])
        med = (errs[len(errs) // 2] if len(errs) % 2 else
               0.5 * (errs[len(errs) // 2 - 1] + errs[len(errs) // 2])) if errs else None
        rows.append([r["name"], r["ranks"]]
                    + [pct(r["val_accuracy"][k - 1]) for k in report]
                    + [r["evaluations"], f"{crit / r['evaluations']:.1f}", crit,
                       f"{crit / base:.2f}", f"{med:.1e}" if med is not None else "–"])
    lines += list_table(["run", "P"] + [f"val. acc. @ {k}" for k in report]
                        + ["gradient evaluations", "critical path per evaluation",
                           "critical path in all", "vs serial",
                           "median gradient error"], rows,
                        caption="Serial against simultaneous training")
    lines += ["", "Critical path: the layer steps a machine with P ranks waits for (serial: "
              "2N per gradient evaluation); gradient error: median of "
              "‖g − g_exact‖ / ‖g_exact‖ over the sampled evaluations. Solvers: "
              + "; ".join(sorted({f"{esc(r['name'])}: `{r['solver']}`" for r in runs[1:]}))
              + ".", ""]
    lines += figure_md(directive, path, "Validation accuracy against L-BFGS steps and "
                       "against layer steps on the critical path")
    return lines


def bench_discrete(rec, directive, path) -> list[str]:
    net, data, s = rec["network"], rec["data"], rec["settings"]
    lines = record_header(rec, path)
    lines += [f"Network: width {net['width']}, depth {net['depth']}, T = {num(net['T'])}, "
              f"{esc(net['activation'])}, {esc(net['opening'])} opening, {net['n_in']} → "
              f"{net['n_classes']}. Data: {esc(data['name'])} ({data['n_train']} training, "
              f"{data['n_test']} test images). {s['epochs']} epochs, batches of "
              f"{s['batch_size']}, seeds {', '.join(map(str, s['seeds']))}.", ""]
    rows = []
    for r in rec["rows"]:
        m = dict(r["method"])
        opt = m.pop("optimizer", {})
        desc = ", ".join(f"{k}={num(v)}" for k, v in m.items() if k not in ("name", "target"))
        desc += f"; {opt.get('name')} lr {num(opt.get('lr'))}" if opt else ""
        rows.append([r["label"],
                     f"{pct(r['test_accuracy_mean'])} ({pct(r['test_accuracy_min'])}–"
                     f"{pct(r['test_accuracy_max'])})", pct(r["train_accuracy_mean"]),
                     pct(r["nonzero_fraction_mean"]), f"{r['wall_s_mean']:.1f}", desc])
    lines += list_table(["row", "test accuracy, mean (min–max)", "train accuracy",
                         "nonzero residual weights", "seconds per run", "method"], rows,
                        caption="Discrete-weight ResNets on digits")
    return lines + [""]


def bench_node(rec, directive, path) -> list[str]:
    s = rec["settings"]
    lines = record_header(rec, path)
    lines += [f"Network x' = {esc(s['activation'])}(K(t) x + b(t)), width {s['width']}, "
              f"{s['depth']} pieces, T = {num(s['T'])}, batch {s['batch']}, P = "
              f"{s['chunks']} chunks, {s['substeps']} fine steps per piece; reference: RK4 "
              f"with {s['ref_substeps']} steps per piece. Counts, not times.", ""]
    rows = []
    for target in s["targets"]:
        for c in rec["cases"]:
            r = c["reached"].get(str(target)) or c["reached"].get(repr(target))
            if r is None:
                continue
            rows.append([c["coarse"], " > ".join(c["schedule"]), num(target),
                         r["iterations"], f"{r['error']:.1e}", r["fine_steps"],
                         r["fine_steps_critical"], r["rhs_evaluations"],
                         r["rhs_evaluations_critical"]])
    lines += list_table(["coarse step", "fine solver", "target", "iterations", "error",
                         "fine steps", "fine steps, critical path", "RHS evaluations",
                         "RHS evaluations, critical path"], rows,
                        caption="Fine work to reach each accuracy target")
    sf = rec.get("serial_fine")
    if sf:
        lines += ["", f"Serial fine RK4 solve (no parareal): error {sf['error']:.1e}, "
                  f"{sf['fine_steps']} steps, {sf['rhs_evaluations']} right-hand-side "
                  "evaluations, all on the critical path."]
    return lines + [""]


def bench_conv(rec, directive, path) -> list[str]:
    peak = rec.get("peak", {})
    st = rec.get("settings", {})
    lines = record_header(rec, path)
    lines += [f"Command `{esc(rec.get('command'))}`; images {esc(rec.get('image_shape'))}, "
              f"{esc(rec.get('activation'))}, {esc(rec.get('dtype'))}; "
              f"{esc(st.get('statistic'))} of {st.get('repeat')} interleaved repeats on "
              f"{st.get('threads')} threads. GFLOP/s count {esc(rec.get('flop_count'))}; the "
              f"peak {num(peak.get('gflops'))} GFLOP/s assumes {esc(peak.get('why'))}.", ""]
    rows = []
    for r in rec["rows"]:
        gf = r.get("cpu_gflops", float("nan"))
        rows.append([r["channels"], r["batch"], r["depth"], ms(r["cpu_ms"] / 1e3),
                     ms(r["torch_ms"] / 1e3), f"{r['torch_over_cpu']:.2f}×", f"{gf:.1f}",
                     f"{100 * gf / peak['gflops']:.1f}%" if peak.get("gflops") else "–",
                     f"{r['max_rel_diff']:.1e}"])
    lines += list_table(["C", "S", "N", "Numba CPU ms", "PyTorch ms", "PyTorch / Numba",
                         "Numba GFLOP/s", "% of peak", "max rel. diff vs PyTorch"], rows,
                        caption="ConvResNet serial gradient (forward + backward), medians")
    lines += [""] + figure_md(directive, path, "PyTorch / Numba time ratio and Numba GFLOP/s "
                              "per cell")
    return lines + [""]


BENCHMARKS = {
    "gradient": bench_gradient,
    "conv": bench_conv,
    "pymgrit": bench_pymgrit,
    "scaling": bench_scaling,
    "simultaneous": bench_simultaneous,
    "discrete": bench_discrete,
    "node": bench_node,
}


class Benchmark(_MarkdownDirective):
    """The tables of one benchmark record."""

    required_arguments = 1
    option_spec = {"record": str}

    def markdown(self) -> list[str]:
        kind = self.arguments[0]
        if kind not in BENCHMARKS:
            raise self.error(f"unknown benchmark {kind!r}; known: {', '.join(BENCHMARKS)}")
        if "record" in self.options:
            path = BENCH_RESULTS / self.options["record"]
        else:
            found = sorted(BENCH_RESULTS.glob(f"{kind}_*.json"))
            if not found:
                raise self.error(f"no record {kind}_*.json in {BENCH_RESULTS}")
            path = found[-1]
        return BENCHMARKS[kind](self.load(path), self, path)


def setup(app):
    app.add_directive("ptoc-validation-table", ValidationTable)
    app.add_directive("ptoc-validation-figures", ValidationFigures)
    app.add_directive("ptoc-benchmark", Benchmark)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
