"""``ptoc validate`` and the claim scripts of ``validation/``, in quick mode.

Every claim script runs in CI; its verdict must be the one its full run gives: ``pass``
for the claims that hold, and for a claim whose check the measurements contradict,
the recorded ``fail`` (listed in ``EXPECTED`` with the reason), so a change of outcome
in either direction is noticed.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from ptoc.cli import main
from ptoc.cli.claims import Record, Verdict, discover, load_script, run_script

FOLDER = Path(__file__).resolve().parent.parent / "validation"
SCRIPTS = discover(FOLDER)

#: Verdicts other than ``pass``, with why (see validation/README.md).
EXPECTED: dict[str, tuple[str, str]] = {
    "ternary_resnet_digits": (
        "fail", "at <= 5% nonzero the ternary net does no better than the no-residual-weights "
        "floor (91.6%), 4 points below float (95.7%); where the floor is within 1 point of "
        "float (identity opening) closeness to float says nothing"),
    "node_schedule": (
        "fail", "with steps per piece set by each scheme's accuracy target, the implicit "
        "order-raising schedules need more overall time steps and linear systems than a fixed "
        "high-order solver in every comparison, and than a fixed low-order one in most: the "
        "first-order iteration needs many steps, and the schedule adds iterations"),
}


def _expected(name):
    if name == "pymgrit_iterations" and importlib.util.find_spec("pymgrit") is None:
        return "skipped"
    return EXPECTED.get(name, ("pass", ""))[0]


def test_there_are_claim_scripts():
    assert "discrete_maximisers" in SCRIPTS


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_claim_quick(name, tmp_path):
    module = load_script(SCRIPTS[name])
    record = run_script(module, name, quick=True, out_dir=tmp_path)
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    for key in ("claim", "source", "verdict", "our_value", "paper_value", "tolerance", "mode"):
        assert key in saved, key
    assert saved["mode"] == "quick" and saved["claim"] == module.CLAIM
    assert saved["source"] and saved["our_value"] is not None or record.verdict == "skipped"
    for fig in record.figures:
        assert (tmp_path / fig).is_file(), fig
    assert record.verdict.value == _expected(name), (record.reason, saved.get("details"))


def test_a_crashing_script_is_a_failed_claim(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("NUMBER = 99\nCLAIM = 'x'\nSOURCE = 'y'\n"
                      "def run(quick, out_dir):\n    raise RuntimeError('boom')\n")
    record = run_script(load_script(script), "broken", quick=True, out_dir=tmp_path / "o")
    assert record.verdict is Verdict.FAIL and "boom" in record.reason
    assert json.loads((tmp_path / "o" / "broken.json").read_text())["verdict"] == "fail"
    (tmp_path / "bad.py").write_text("NUMBER = 1\n")
    with pytest.raises(AttributeError, match="CLAIM"):
        load_script(tmp_path / "bad.py")


def test_from_checks_names_what_failed():
    r = Record.from_checks({"a holds": True, "b holds": False}, 1.0)
    assert r.verdict is Verdict.FAIL and "b holds" in r.reason and "a holds" not in r.reason
    assert Record.from_checks({"a": True}, 1.0).verdict is Verdict.PASS


def test_validate_command(tmp_path, capsys):
    assert main(["validate", "--quick", "--only", "discrete_maximisers", "--dir", str(FOLDER),
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "discrete_maximisers" in out and "PASS" in out
    assert (tmp_path / "discrete_maximisers.json").is_file()
    assert main(["validate", "--list", "--dir", str(FOLDER)]) == 0
    assert "discrete_maximisers" in capsys.readouterr().out
    assert main(["validate", "--only", "nope", "--dir", str(FOLDER)]) == 2
    assert "no claim named 'nope'" in capsys.readouterr().err
    assert main(["validate", "--dir", str(tmp_path / "missing")]) == 2
    assert "no validation folder" in capsys.readouterr().err


def test_the_readme_table_is_the_committed_records():
    """validation/README.md's claims table is generated from the records
    (``ptoc validate --readme``); it must not drift from them."""
    from ptoc.cli.claims import README_BEGIN, README_END, readme_table

    text = (FOLDER / "README.md").read_text(encoding="utf-8")
    generated = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip()
    assert generated == readme_table(FOLDER)
    numbers = [int(line.split("|")[1]) for line in generated.splitlines()[2:]]
    assert numbers == sorted(numbers) and len(numbers) == len(set(numbers))


def test_readme_option_rewrites_only_the_table(tmp_path):
    folder = tmp_path / "validation"
    (folder / "results").mkdir(parents=True)
    (folder / "one.py").write_text("NUMBER = 1\n")
    Record(Verdict.FAIL, {"x": 0.5}, paper_value="1 | 2", tolerance=None, reason="no",
           name="one", claim="a claim", source="a paper").save(folder / "results")
    from ptoc.cli.claims import README_BEGIN, README_END

    (folder / "README.md").write_text(f"intro\n{README_BEGIN}\nold\n{README_END}\nend\n")
    assert main(["validate", "--dir", str(folder), "--readme"]) == 0
    text = (folder / "README.md").read_text()
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\nend\n")
    assert "| 1 | a claim (`one`) | a paper | **fail** | x: 0.5 (no) | 1 \\| 2 | – |" in text
    (folder / "README.md").write_text("no markers\n")
    assert main(["validate", "--dir", str(folder), "--readme"]) == 2
