"""Every ```python block of README.md and docs/*.md runs as written, each in a fresh namespace.

Convention for blocks that cannot run in this process: the block's first line is a comment
``# requires: <what>`` (anything may follow, e.g. the example that runs it):
- ``# requires: cuda``: run only where CUDA is available (skipped on a CPU-only machine);
- ``# requires: torchrun``: needs a multi-process group (its variables are that rank's tensors); never run here,
  only compiled. Such a block must name the runnable example under examples/ that covers it, and that example is
  run by tests/distributed/test_examples.py.
Any other block runs on the CPU here (at sizes that take seconds; the torch.compile block pays one compilation).
Skipped blocks are still compiled, so their syntax is checked.
Also checked: relative links of these files resolve, and every script under examples/ is named in them and run by
a test.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REQUIRES = re.compile(r"#\s*requires:\s*(\w+)")
KNOWN_REQUIREMENTS = ("cuda", "torchrun")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(first line number, source)`` of each fenced ```python block of a markdown file."""
    blocks, source, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if source is None and line.strip() == "```python":
            source, start = [], number + 1
        elif source is not None and line.strip() == "```":
            blocks.append((start, "\n".join(source) + "\n"))
            source = None
        elif source is not None:
            source.append(line)
    assert source is None, f"{path.name}: unclosed ```python block from line {start}"
    return blocks


def requirement(source: str) -> str | None:
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    found = REQUIRES.match(first)
    return found.group(1) if found else None


BLOCKS = [
    pytest.param(path, line, source, id=f"{path.relative_to(ROOT)}:{line}")
    for path in DOCUMENTS
    for line, source in python_blocks(path)
]


def test_the_readme_has_python_blocks():
    assert len(python_blocks(ROOT / "README.md")) >= 5


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    targets = re.findall(r"\]\(([^)#\s]+)[^)]*\)", path.read_text())
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not missing, f"{path.name} links to missing files: {missing}"


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_is_documented_and_run_by_a_test(example):
    documents = "".join(path.read_text() for path in DOCUMENTS)
    tests = "".join(path.read_text() for path in (ROOT / "tests").rglob("*.py") if path.name != "test_docs.py")
    assert f"examples/{example}" in documents, f"examples/{example} is not mentioned in README.md or docs/"
    assert f'"{example}"' in tests, f"no test runs examples/{example}"


@pytest.mark.parametrize("path, line, source", BLOCKS)
def test_block_runs(path, line, source, monkeypatch, tmp_path):
    code = compile(source, f"{path.relative_to(ROOT)}:{line}", "exec")
    needs = requirement(source)
    assert needs in (None, *KNOWN_REQUIREMENTS), f"unknown '# requires: {needs}' (known: {KNOWN_REQUIREMENTS})"
    if needs == "torchrun":
        example = re.search(r"examples/\w+\.py", source.splitlines()[0])
        assert example and (ROOT / example.group(0)).is_file(), "a torchrun block must name its runnable example"
        pytest.skip(f"multi-process block; {example.group(0)} runs it (tests/distributed/test_examples.py)")
    if needs == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays out of the checkout
    torch.manual_seed(0)
    exec(code, {"__name__": "__docs__"})
