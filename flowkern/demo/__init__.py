"""The demo of `python -m flowkern demo` (``main``) and what it is built from:
2-D toy data, sample distances, a small MLP flow model and its trainer
(``toy``), small PFGM / PFGM++ models and their trainer (``pfgm_models``),
and the demo's sections (``pfgm``, ``rectified``, ``digits``).

One use of the library, kept apart from it: nothing under flowkern/ outside
this package imports it (tests/test_layering.py).
"""
