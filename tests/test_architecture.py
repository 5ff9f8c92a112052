"""Keeps ARCHITECTURE.md's layer table true by parsing every module's imports."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer -> top-level modules it must never import
FORBIDDEN = {
    "medichain_jax": {
        "sim",
        "calimero_adapter",
        "ray",
        "httpx",
        "requests",
        "socket",
        "tqdm",
        "rich",
        "matplotlib",
        "orbax",
        "logging",
        "time",
        "random",
    },
    "sim": {"calimero_adapter"},
    "calimero_adapter": {"ray"},
}
# the real mode shares the simulator's pieces (config, loaders, results files), never its loop
CALIMERO_NEVER = {"sim.runner", "sim.cli", "sim.ray_sim", "sim.sweep", "sim.bench"}
# inside the pure library only the data readers may touch files
FILE_IO = {"os", "pathlib", "shutil", "io", "glob", "pydicom", "sqlite3", "csv", "PIL"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_only_what_they_may(package):
    bad = []
    for path in modules(package):
        hit = imports_of(path) & FORBIDDEN[package]
        if package == "medichain_jax" and "data" not in path.relative_to(ROOT / package).parts:
            hit |= imports_of(path) & FILE_IO
        if hit:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hit)}")
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_pure_library_has_no_global_numpy_rng():
    bad = []
    for path in modules("medichain_jax"):
        text = path.read_text()
        for needle in (
            "np.random.seed",
            "np.random.rand(",
            "np.random.randn(",
            "np.random.choice(",
            "np.random.normal(",
            "np.random.uniform(",
            "np.random.shuffle(",
        ):
            if needle in text:
                bad.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not bad, bad


def test_real_mode_never_imports_the_simulation_loop():
    bad = []
    for path in modules("calimero_adapter"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n in CALIMERO_NEVER]
    assert not bad, "\n".join(bad)
