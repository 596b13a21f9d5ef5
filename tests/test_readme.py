"""README.md and .ci/run agree: CI runs exactly the README's test command, and the two
commands a newcomer copies are single lines that set up a venv and run the right thing."""
import os
import re
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CI = os.path.join(ROOT, ".ci", "run")


def readme_command(name):
    text = open(README).read()
    m = re.search(rf"^<!-- {name} -->\n```bash\n(.*?)\n```\n<!-- /{name} -->$", text, re.M | re.S)
    assert m, f"README.md has no ```bash block between <!-- {name} --> markers"
    lines = [ln for ln in m.group(1).splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_commands_are_one_line_each():
    main = readme_command("main-command")
    test = readme_command("test-command")
    for cmd in (main, test):
        assert cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e ")
    assert main.endswith("python -m fastkd.bench")
    assert '".[test,hf]"' in test and test.endswith("python -m pytest -q -n auto")


def test_ci_runs_the_readme_test_command():
    script = open(CI).read()
    assert os.stat(CI).st_mode & stat.S_IXUSR, ".ci/run must be executable"
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script
    assert "readme_command test-command" in script and 'eval "$test_cmd"' in script
    assert "FASTKD_REQUIRE_BACKENDS=torch,cpp,triton" in script
    assert "pip install --quiet torch==2.13.0" in script
    assert '"$rc" -eq 5' in script  # pytest's "no tests collected" fails CI
    assert "python -m fastkd.bench --quick" in script


def test_ci_extracts_the_same_line():
    """Run .ci/run's own extraction function on the README and compare."""
    if subprocess.run(["bash", "-c", "command -v awk"], capture_output=True).returncode:
        pytest.skip("no awk")
    script = open(CI).read()
    fn = script[script.index("readme_command() {"):script.index("test_cmd=")]
    out = subprocess.run(["bash", "-c", fn + "\nreadme_command test-command"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == readme_command("test-command")
