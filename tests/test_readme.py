"""Every Python block of README.md runs as the reader would run it, so the README cannot drift
from the code.

Each ```python block is written to a file and run in a fresh interpreter, on the checkout under
test, with UserWarnings as errors: a block must be self-contained and finish in seconds on a
CPU. A block whose first line is ``# Run with: torchrun <arguments> <script>.py`` is launched so,
through ``torch.distributed.run``, on one rank: with two gloo ranks, torch 2.13 aborts one rank at
interpreter exit, after destroy_process_group(), in about one run in twenty ("terminate called
without an active exception"; seen with a plain DDP loop too), and tests/test_distributed.py
covers the step on two ranks. A block whose first line is ``# Not run by the tests: <why>`` is
only compiled. Other fences (```bash) are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
README = REPOSITORY / "README.md"
NOT_RUN = re.compile(r"# Not run by the tests: (?P<why>.+)")
TORCHRUN = re.compile(r"# Run with: torchrun (?P<arguments>.+) \S+\.py")
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    section: str
    code: str

    @property
    def first_line(self) -> str:
        return self.code.split("\n", 1)[0]


def python_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("info").strip() != "python":
            continue
        before = text[: match.start()]
        headings = re.findall(r"^#+ (.+)$", before, re.MULTILINE)
        blocks.append(Block(before.count("\n") + 1, headings[-1] if headings else "", match.group("code")))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks_and_every_one_is_run_or_says_why_not():
    assert len(BLOCKS) == README.read_text(encoding="utf-8").count("```python\n") > 0
    for block in BLOCKS:
        if block.first_line.startswith("# Not run"):
            assert NOT_RUN.fullmatch(block.first_line), f"line {block.line}: as '# Not run by the tests: <why>'"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda block: f"line{block.line}-{block.section}")
def test_readme_block(block, tmp_path):
    compile(block.code, f"README.md:{block.line}", "exec")
    not_run = NOT_RUN.fullmatch(block.first_line)
    if not_run:
        pytest.skip(f"README.md line {block.line}: {not_run.group('why')}")
    script = tmp_path / "train.py"
    script.write_text(block.code, encoding="utf-8")
    torchrun = TORCHRUN.fullmatch(block.first_line)
    launcher = []
    if torchrun:
        arguments = re.sub(r"--nproc[-_]per[-_]node[= ]\d+", "--nproc-per-node=1", torchrun.group("arguments"))
        launcher = ["-m", "torch.distributed.run", *arguments.split()]
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "error::UserWarning",  # reaches the ranks torchrun starts, too
    }
    result = subprocess.run(
        [sys.executable, *launcher, str(script)],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"README.md line {block.line} failed:\n{result.stdout}\n{result.stderr}"
