"""Sphinx configuration of the moeae documentation.

Build it with ``sphinx-build -W --keep-going -b html docs docs/_build/html`` after
``pip install -e '.[docs]'``. Pages are Markdown (MyST) or reStructuredText; the API reference
is generated from the numpydoc docstrings and the CLI reference from ``moeae.cli.build_parser``.
"""

import moeae

project = "moeae"
author = "the moeae authors"
copyright = "the moeae authors"
release = moeae.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",  # the API reference, from the docstrings
    "numpydoc",  # ... which are numpydoc
    "sphinx.ext.viewcode",  # links from the reference to the highlighted source
    "sphinxarg.ext",  # the CLI reference, from the argparse parser
    "myst_parser",  # Markdown pages
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

# Python objects that a reference names but cannot resolve are warnings, and warnings fail the
# build (-W): a renamed function breaks the docs instead of leaving a dead link.
nitpicky = True
nitpick_ignore_regex = [
    # types that live in other projects' documentation (no network at build time)
    (r"py:.*", r"(np|numpy|torch|nn|matplotlib|sklearn|argparse|os|pathlib)\..*"),
    (r"py:.*", r"(ndarray|array-like|Path|PathLike|Tensor|Module|Figure|Axes|optional)"),
    (r"py:.*", r"multiprocessing\..*"),
    # module constants (SCAN_ROWS, ...) are explained by comments in the source, which autodoc
    # does not read; a docstring may still name them
    ("py:data", r"[A-Z][A-Z0-9_]*"),
    # moeae.training's Trainer docstring names the model class without its module
    ("py:class", "MoEAE"),
    ("py:class", "(TrainingData|Context|DataParallel|MoEOutput|TrainConfig)"),
]
autodoc_typehints = "none"  # the docstrings give types, in numpydoc's words
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
numpydoc_show_class_members = False  # autodoc lists members; numpydoc would add stub tables
numpydoc_xref_param_type = False

myst_heading_anchors = 3  # links to a page's sections: [text](page.md#a-heading)
myst_enable_extensions = ["colon_fence"]

html_theme = "furo"
html_title = f"moeae {release}"
