"""README's Python example runs as written."""

import os
import re

import pytest

pytest.importorskip("torch")

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def test_readme_python_example_runs():
    text = open(README, encoding="utf-8").read()
    section = text.split("## Python and PyTorch", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "README's Python section has one python example"
    exec(compile(blocks[0], "README.md (Python example)", "exec"), {})
