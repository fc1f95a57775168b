"""The repository's promises about itself."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    test_cmd = next(line.strip() for line in readme if "pytest" in line and line.startswith("    "))
    assert test_cmd in ci, f"README test command {test_cmd!r} is not what .ci/run runs"
    # the README opens with its two commands
    commands = [line.strip() for line in readme[:12] if line.startswith("    ")]
    assert len(commands) == 2 and "benchmarks" in commands[0] and "pytest" in commands[1]
