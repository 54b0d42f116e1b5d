"""Sphinx configuration for pyro-flowpack."""

import os
import sys
from importlib import metadata

sys.path.insert(0, os.path.abspath(".."))

project = "pyro-flowpack"
author = "the pyro-flowpack developers"
copyright = "2025, the pyro-flowpack developers"
try:
    release = metadata.version("pyro-flowpack")
except metadata.PackageNotFoundError:
    release = "unknown"
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx.ext.mathjax",
]

# Docstrings follow the Google style (zuko's `Arguments:` / `Returns:` / `References:`).
napoleon_google_docstring = True
napoleon_numpy_docstring = False

autodoc_member_order = "bysource"
# Overridden torch and Pyro methods would otherwise repeat their upstream docstrings.
autodoc_inherit_docstrings = False
nitpicky = False

# Inline Python code in docstrings, as in zuko: :py:`None`.
rst_prolog = """
.. role:: py(code)
   :class: highlight
   :language: python
"""

exclude_patterns = ["_build"]

html_theme = "alabaster"
