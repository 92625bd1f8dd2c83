"""Sphinx configuration for the book as a website: `make book` -> build/html/index.html.

The pages are the committed notebooks with their stored outputs: nothing is executed here. `site/book` is a
symlink to `../book`, so the chapters (and their figures) sit inside this source folder under the same
relative paths the README uses (`book/01_naive_attention.ipynb`, `book/figures/...`).
Chapters are found by pattern, not listed: `book/[0-9][0-9]_*.ipynb` in order, then the appendices
`book/A*_*.ipynb` (see the toctree in index.md), so adding or renumbering a chapter needs no change here.
"""

import flashdecode

project = "flashdecode"
author = "the flashdecode authors"
copyright = "the flashdecode authors"
release = version = flashdecode.__version__

extensions = [
    "myst_nb",  # the notebooks and the Markdown pages (it brings myst_parser)
    "sphinx.ext.autodoc",  # the API page, from the docstrings of the installed (built) package
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # copies MathJax 3 into _static/mathjax and points mathjax_path there: no CDN
]

root_doc = "index"
# only these are pages; anything else in book/ (export.py, checkpoints, scratch notebooks) is not picked up
include_patterns = ["index.md", "api.md", "book/[0-9][0-9]_*.ipynb", "book/A*_*.ipynb"]
exclude_patterns = ["**/.ipynb_checkpoints"]

# render what the notebooks store; never run them (CI already runs every notebook under nbval)
nb_execution_mode = "off"
# widget outputs carry no widget state (make run stores none), so the live view would render as nothing:
# show the text/plain fallback instead, which says to run the notebook in Jupyter; the static frames follow it
nb_mime_priority_overrides = [("html", "application/vnd.jupyter.widget-view+json", None)]
# $...$ and $$...$$ in the notebooks' Markdown, as Jupyter renders them
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # `[text](#a-heading)` links inside a chapter resolve

autodoc_member_order = "bysource"
autodoc_typehints = "description"

html_theme = "sphinx_book_theme"
html_title = "flashdecode"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,  # the .ipynb source of each chapter, served with the site
    "use_fullscreen_button": False,
}
html_last_updated_fmt = None
html_copy_source = True
html_show_sphinx = False


def _plain_docstring(app, what, name, obj, options, lines):
    """The package's docstrings are plain prose, not reStructuredText: `|p - j|` is an absolute value there, not
    a substitution reference (which -W would turn into an error), so bars are escaped before autodoc parses them."""
    lines[:] = [line.replace("|", "\\|") for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _plain_docstring)
