"""The package's layers: data -> models -> ranking -> training -> stages; the CLI's error line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mmrecall"
# A module may import its own layer and the ones before it; `shared` (config, tracking, errors) is below all.
LAYERS = ["shared", "data", "models", "ranking", "training", "stages", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every mmrecall module `path` imports (relative imports resolved; `from x import y` counts x.y if y is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("mmrecall")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if not base.startswith("mmrecall"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / sub.replace(".", "/")).is_dir()
                out.add(sub if is_module else base)
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "shared"
    return parts[1] if parts[1] in LAYERS else "shared"


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_walker_sees_relative_and_absolute_imports():
    assert "mmrecall.ranking.metrics" in imports_of(MODULES["mmrecall.ranking.outputs"])  # from .metrics import ...
    assert "mmrecall.ranking.ranker" in imports_of(MODULES["mmrecall.ranking.ranker_model"])  # absolute
    assert "mmrecall.ranking.members" in imports_of(MODULES["mmrecall.training.fit"])  # from ..ranking import members


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) != "stages"))
def test_no_library_module_imports_a_stage(module):
    stages = sorted(i for i in imports_of(MODULES[module]) if layer(i) == "stages" and i != "mmrecall.stages")
    assert not stages or module == "mmrecall.cli", f"{module} imports stage module(s) {stages}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_only_import_downwards(module):
    mine = LAYERS.index(layer(module))
    upward = sorted(i for i in imports_of(MODULES[module]) if LAYERS.index(layer(i)) > mine)
    assert not upward, f"{module} ({layer(module)}) imports from a later layer: {upward}"


@pytest.mark.parametrize("code", ["mmrecall.ranking.ranker_model", "mmrecall.ranking.member_model"])
def test_the_logged_models_code_reaches_library_modules_only(code):
    seen, todo = set(), [code]
    while todo:
        module = todo.pop()
        if module in seen or module not in MODULES:
            continue
        seen.add(module)
        todo += imports_of(MODULES[module])
    assert "mmrecall.ranking.ranker" in seen and "mmrecall.data.ingest" in seen
    assert not [m for m in seen if layer(m) in ("stages", "training", "cli")], sorted(seen)


def test_every_command_is_a_stage_module_with_main():
    from mmrecall import cli

    for command in cli.COMMANDS:
        module = cli.module_name(command)
        assert module in MODULES, f"`mmrecall {command}` has no module {module}"
        assert "def main(" in MODULES[module].read_text()
    assert {m.rpartition(".")[2] for m in MODULES if layer(m) == "stages"} - {"stages"} == {
        c.replace("-", "_") for c in cli.COMMANDS}


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    cmd = [sys.executable, "-m", "mmrecall.cli", "evaluate", "--submission", "missing.csv", "--answers",
           "data/valid/valid_answer.json"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip() == "mmrecall evaluate: error: missing.csv: file not found"
    debug = subprocess.run([*cmd, "--debug"], cwd=tmp_path, capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "MissingInputError: missing.csv: file not found" in debug.stderr

    bad = subprocess.run([sys.executable, "-m", "mmrecall.cli", "prepare", "--split", "valid"], cwd=tmp_path,
                         capture_output=True, text=True)  # no data: a missing stage input, named
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "mmrecall prepare: error: data/valid/valid.tsv: file not found"
