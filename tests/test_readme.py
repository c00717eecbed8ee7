"""Every command README.md and docs/ give for train.py, eval.py, iti.py and export.py parses as written.

The commands themselves need a 7B model, the Hub or a GPU; what can be checked everywhere is that
each names flags the script has, with values it accepts (argparse exits 2 otherwise). Placeholders
(T, S, D, $fold, $(...)) stand for values a reader fills in and are replaced by valid ones. The
tiny no-download demo, where the README gives one, is run for real.
"""
import re
import shlex
import subprocess
import sys

import pytest

import eval as evaluation
import export
import iti
import train
from conftest import ROOT

SCRIPTS = {"train.py": train.parse_args, "eval.py": evaluation.parse_args, "iti.py": iti.parse_args,
           "export.py": export.parse_args}
PLACEHOLDERS = {"T": "clutrr", "S": "1", "D": "float32", "$fold": "0"}


def documented_commands():
    """(file, command) for every line of README.md and docs/*.md that runs one of SCRIPTS."""
    found = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"\\\n\s*", " ", page.read_text())  # join continued lines
        for line in text.splitlines():
            line = line.split(" # ")[0].split("   #")[0].strip().rstrip("&").strip()
            match = re.match(r"^(?:python|torchrun(?: --\S+(?: \d+)?)*) (train|eval|iti|export)\.py (.*)$", line)
            if match:
                found.append((page.name, f"{match.group(1)}.py", match.group(2)))
    return found


COMMANDS = documented_commands()


def test_the_docs_give_commands():
    assert len(COMMANDS) >= 10 and {script for _, script, _ in COMMANDS} >= {"train.py", "eval.py", "iti.py"}


@pytest.mark.parametrize("page, script, args", COMMANDS, ids=[f"{p}:{a[:50]}" for p, _, a in COMMANDS])
def test_documented_command_parses(page, script, args):
    args = re.sub(r'"\$\([^)]*\)"', "model.gguf", args)
    argv = [PLACEHOLDERS.get(token, token) for token in shlex.split(args)]
    SCRIPTS[script](argv)  # raises SystemExit(2) on an unknown flag or a bad value


def test_tiny_demo_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    demo = re.search(r"^python train\.py [^\n]*--model tests/assets/stories260K[^\n]*$", readme, re.M)
    if demo is None:
        pytest.skip("the README gives no no-download demo command")
    argv = shlex.split(demo.group(0))[2:]
    out = argv.index("--out")
    argv[out + 1] = str(tmp_path / "demo")
    done = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "demo" / "adapter.safetensors").is_file()
