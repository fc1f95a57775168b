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


def test_cuda_instantiations_are_generated():
    # the tensor-core instantiation files are written by a script; a hand edit or a new
    # head-dim bucket without rerunning it would leave a kernel unlinked or stale
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_cuda_instantiations.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.stale() == [], "rerun scripts/gen_cuda_instantiations.py"
    # head_dim_switch's buckets (attention_params.h) are the script's
    src = (ROOT / "csrc" / "cuda" / "attention_params.h").read_text()
    switch = src[src.index("void head_dim_switch("):]
    switch = switch[:switch.index("\n}\n")]
    assert sorted({int(d) for d in re.findall(r"integral_constant<int, (\d+)>", switch)}) == sorted(gen.HEAD_DIMS)


def test_each_op_family_has_one_body_and_one_backend_file_per_device():
    # README "Layout": an op is found in one guess by its family name (attention, linear)
    registering = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
                         if p.suffix in (".cpp", ".cu", ".h", ".cuh") and "TORCH_LIBRARY" in p.read_text())
    expected = ["csrc/ops.cpp"]
    for family in ("attention", "linear"):
        assert (ROOT / "csrc" / "common" / f"{family}_op.h").is_file()
        expected += [f"csrc/cpu/{family}_ops.cpp", f"csrc/cuda/{family}_ops.cu"]
    assert registering == sorted(expected)


def test_benchmarks_hold_code_and_results_only():
    # logs of GPU sessions live in docs/gpu_runs/; their figures in benchmarks/RESULTS.md, the
    # plots of its sections in benchmarks/plots/; benchmarks/out/ is what non-full runs write (git-ignored)
    bench = ROOT / "benchmarks"
    stray = [str(p.relative_to(ROOT)) for p in bench.rglob("*")
             if p.is_file() and p.suffix not in (".py", ".sh", ".md", ".pyc")
             and not (p.suffix == ".png" and p.parent == bench / "plots") and (bench / "out") not in p.parents]
    assert not stray, stray
