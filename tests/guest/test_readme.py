"""The README's code blocks, executed as written, on the real kernel around a real kexec."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def block(tag: str) -> str:
    m = re.search(rf"```python {re.escape(tag)}\n(.*?)```", README.read_text(), re.S)
    assert m, f"README has no ```python {tag} block"
    return m.group(1)


def test_readme_vfio_example():
    exec(compile(block("readme-vfio"), "README.md[readme-vfio]", "exec"), {})


def test_readme_batch_example():
    exec(compile(block("readme-batch"), "README.md[readme-batch]", "exec"), {})


class TestReadmeLiveUpdate:
    @pytest.mark.before_kexec
    def test_before(self):
        exec(compile(block("readme-before-kexec"), "README.md[readme-before-kexec]", "exec"), {})

    @pytest.mark.after_kexec
    def test_after(self):
        exec(compile(block("readme-after-kexec"), "README.md[readme-after-kexec]", "exec"), {})
