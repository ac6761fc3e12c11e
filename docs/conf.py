"""Sphinx configuration of the ptoc documentation (builds offline; CI: warnings are errors)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("_ext"))  # ptoc_records: tables from the JSON records
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")  # the CUDA module imports without a GPU

import ptoc  # noqa: E402

project = "ptoc"
author = "the ptoc authors"
copyright = "2026, the ptoc authors"  # noqa: A001
release = ptoc.__version__
version = release

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "ptoc_records",
]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "**/_generated_*"]

autosummary_generate = True
autodoc_typehints = "none"          # the numpydoc sections carry the types
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "alabaster"
html_title = f"ptoc {release}"
html_static_path = []
templates_path = ["_templates"]
nitpicky = False
