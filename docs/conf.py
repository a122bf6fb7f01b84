"""Sphinx configuration of pyvfio-lu's reference documentation (``bash scripts/docs``).

autodoc imports the package, so it must be installed with its compiled extension
(``pip install -e '.[docs]'``); nothing here needs a kernel with LUO or VFIO.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))

import pyvfio_lu  # noqa: E402  (the version comes from the package, the one place it is written)

project = "pyvfio-lu"
author = "the pyvfio-lu authors"
copyright = "the pyvfio-lu authors"
version = release = pyvfio_lu.__version__

extensions = [
    "sphinx.ext.autodoc",   # the API reference, from the docstrings (reStructuredText)
    "sphinx.ext.doctest",   # the examples in these pages run as tests: sphinx-build -b doctest
    "sphinx.ext.viewcode",  # a link from each documented object to its source
    "pyvfio_docs",          # generated pages: errors, CLI help, the README's uAPI table
]

exclude_patterns = ["_build"]
root_doc = "index"
default_role = "code"   # `text` is inline code, as in the README
smartquotes = False    # error messages and commands are shown exactly as they are
nitpicky = False        # annotations name TYPE_CHECKING-only types; unresolved ones stay plain text

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # show `/sys`, not an evaluated constant
autoclass_content = "both"  # a class's docstring and its __init__'s

doctest_global_setup = "import errno"

html_theme = "alabaster"
html_title = f"pyvfio-lu {release}"
html_theme_options = {"description": "Linux VFIO and Live Update from Python", "fixed_sidebar": True}
html_static_path: list[str] = []
