"""pyvfio-lu's benchmarks against C, measured in the QEMU guest on the project's kernel.

``python -m benchmarks`` (``--smoke`` for a quick check); see ``benchmarks/run.py`` and
the latest figures in ``benchmarks/RESULTS.md``.
"""
