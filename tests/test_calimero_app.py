"""The Calimero app (calimero_adapter/app), its merobox workflow and its build script agree
with what the Python adapter calls: method names and argument names, the wasm path, and a
build that fails clearly without a Rust toolchain. No Rust toolchain is needed here: lib.rs
is read as text."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from calimero_adapter.ledger import APP_METHODS

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "calimero_adapter" / "app"
LIB_RS = APP / "src" / "lib.rs"
BUILD_SH = APP / "build.sh"
CARGO_TOML = APP / "Cargo.toml"
WORKFLOW = ROOT / "calimero_adapter" / "workflows" / "medichain.yml"


def app_methods() -> dict[str, list[str]]:
    """The adapter's method -> argument names table (what it sends to the app)."""
    return {str(name): list(args) for name, args in APP_METHODS.items()}


# ---- lib.rs, read as text ----------------------------------------------------------------


def _strip_rust(src: str) -> str:
    """Drop line comments, string and char literals, so braces and `pub fn` in them don't count."""
    src = re.sub(r'"(?:[^"\\]|\\.)*"', '""', src)
    src = re.sub(r"'(?:[^'\\\n]|\\.)'", "' '", src)
    return re.sub(r"//[^\n]*", "", src)


def _logic_impl(src: str) -> str:
    """The body of the ``impl`` that follows ``#[app::logic]``."""
    m = re.search(r"#\[app::logic\]\s*impl\b[^{]*\{", src)
    assert m, "no `#[app::logic] impl ... {` in lib.rs"
    depth, i = 1, m.end()
    while depth:
        assert i < len(src), "unbalanced braces after #[app::logic]"
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        i += 1
    return src[m.end() : i - 1]


def _split_top_level(params: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in params:
        if ch in "<([":
            depth += 1
        elif ch in ">)]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [p.strip() for p in out if p.strip()]


def parse_app_methods(src: str) -> dict[str, dict]:
    """``pub fn name(&self | &mut self, arg: Type, ...)`` in the logic impl ->
    {name: {"args": [...], "receiver": "&self" | "&mut self" | None, "attrs": "..."}}."""
    body = _logic_impl(_strip_rust(src))
    methods: dict[str, dict] = {}
    pattern = r"((?:#\[[^\]]*\]\s*)*)pub\s+fn\s+(\w+)\s*(?:<[^>]*>)?\s*\(([^)]*)\)"
    for m in re.finditer(pattern, body, re.S):
        attrs, name, params = m.group(1), m.group(2), m.group(3)
        receiver, args = None, []
        for p in _split_top_level(params):
            if re.fullmatch(r"&\s*(?:'\w+\s+)?(?:mut\s+)?self|(?:mut\s+)?self", p):
                receiver = re.sub(r"\s+", " ", p)
                continue
            arg = re.match(r"(?:mut\s+)?(\w+)\s*:", p)
            assert arg, f"cannot read parameter {p!r} of {name}"
            args.append(arg.group(1))
        assert name not in methods, f"{name} declared twice"
        methods[name] = {"args": args, "receiver": receiver, "attrs": attrs}
    return methods


@pytest.fixture(scope="module")
def lib_methods() -> dict[str, dict]:
    return parse_app_methods(LIB_RS.read_text())


def test_the_local_table_mirrors_the_adapter_when_it_has_one():
    table = app_methods()
    assert table, "empty method table"
    assert all(isinstance(args, list) for args in table.values())
    assert {"set", "get", "entries", "init"} <= set(table)


def test_lib_rs_declares_every_method_with_the_adapters_argument_names(lib_methods):
    table = app_methods()
    missing = sorted(set(table) - set(lib_methods))
    assert not missing, f"lib.rs lacks {missing}"
    for name, args in table.items():
        assert lib_methods[name]["args"] == args, (name, lib_methods[name]["args"], args)


def test_receivers_init_and_views(lib_methods):
    assert lib_methods["init"]["receiver"] is None
    assert "#[app::init]" in lib_methods["init"]["attrs"]
    for name in ("set", "remove", "open_round", "publish_global", "register_site"):
        assert lib_methods[name]["receiver"] == "&mut self", name
    for name in ("get", "entries", "entries_with_prefix"):
        assert lib_methods[name]["receiver"] == "&self", name


def test_the_parser_reads_multiline_signatures():
    src = """
    #[app::logic]
    impl S {
        // pub fn commented_out(&self, x: u8)
        pub fn a(
            &mut self,
            run: String,
            map: BTreeMap<String, String>,
        ) -> app::Result<()> { let s = "pub fn fake(&self) {"; Ok(()) }
        fn private(&self, y: u8) {}
        #[app::view]
        pub fn b(&self) -> u8 { 0 }
    }
    pub fn outside(z: u8) {}
    """
    methods = parse_app_methods(src)
    assert set(methods) == {"a", "b"}
    assert methods["a"]["args"] == ["run", "map"]
    assert methods["a"]["receiver"] == "&mut self"
    assert methods["b"]["args"] == [] and "#[app::view]" in methods["b"]["attrs"]


def _fn_body(src: str, name: str) -> str:
    body = _logic_impl(_strip_rust(src))
    m = re.search(rf"pub\s+fn\s+{name}\s*\([^)]*\)[^{{]*\{{", body, re.S)
    assert m, name
    depth, i = 1, m.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(body[i], 0)
        i += 1
    return body[m.end() : i - 1]


def test_round_operations_check_the_coordinator_and_events_exist():
    src = LIB_RS.read_text()
    for name in ("open_round", "publish_global", "register_site"):
        assert "ensure_coordinator" in _fn_body(src, name), name
    assert "env::account_id()" in src and "env::device_id()" in src
    m = re.search(r"#\[app::event\]\s*pub\s+enum\s+Event\s*(?:<[^>]*>)?\s*\{(.*?)\n\}", src, re.S)
    assert m, "no #[app::event] enum Event"
    events = {
        v: sorted(re.findall(r"(\w+)\s*:", fields))
        for v, fields in re.findall(r"(\w+)\s*\{([^}]*)\}", m.group(1))
    }
    assert events["Inserted"] == ["key", "value"]
    assert events["Updated"] == ["key", "value"]
    assert events["Removed"] == ["key"]
    assert events["RoundOpened"] == ["round", "run"]
    assert events["GlobalPublished"] == ["round", "run"]
    assert events["SiteRegistered"] == ["run", "site"]


# ---- build.sh and the wasm it produces -----------------------------------------------------


def built_wasm_path() -> str:
    """The wasm build.sh writes, relative to the repository root."""
    text = BUILD_SH.read_text()
    name = re.search(r'^WASM_NAME="([^"]+)"', text, re.M)
    out = re.search(r'^OUT="\$APP_DIR/([^"]+)"', text, re.M)
    assert name and out, "build.sh must set WASM_NAME and OUT"
    rel = out.group(1).replace("$WASM_NAME", name.group(1))
    return (APP / rel).relative_to(ROOT).as_posix()


def test_build_sh_output_matches_the_crate():
    assert built_wasm_path() == "calimero_adapter/app/res/medichain_ledger.wasm"
    cargo = CARGO_TOML.read_text()
    assert re.search(r'^name = "medichain-ledger"', cargo, re.M)
    assert re.search(r'crate-type = \[[^\]]*"cdylib"', cargo)
    tags = set(re.findall(r'calimero-network/core", tag = "([^"]+)"', cargo))
    assert len(tags) == 1, f"calimero crates must share one tag, got {tags}"


def test_build_sh_is_executable():
    assert os.access(BUILD_SH, os.X_OK), "chmod +x calimero_adapter/app/build.sh"
    assert BUILD_SH.read_text().startswith("#!/usr/bin/env bash")


def test_build_sh_fails_clearly_without_cargo(tmp_path):
    if any(Path(d, "cargo").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("cargo is installed in /usr/bin or /bin, so it cannot be taken off PATH")
    if not any(Path(d, "bash").exists() for d in ("/usr/bin", "/bin")):
        pytest.skip("no bash in /usr/bin or /bin")
    copy = tmp_path / "app"
    shutil.copytree(APP, copy, ignore=shutil.ignore_patterns("target", "res"))
    p = subprocess.run(
        [str(copy / "build.sh")],
        cwd=copy,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    message = (p.stdout + p.stderr).lower()
    assert p.returncode != 0, message
    assert "cargo" in message or "wasm32-unknown-unknown" in message, message
    assert not (copy / "res").exists()


# ---- the merobox workflow ------------------------------------------------------------------


def _steps(steps):
    for step in steps or []:
        yield step
        yield from _steps(step.get("steps"))


@pytest.fixture(scope="module")
def workflow() -> dict:
    wf = yaml.safe_load(WORKFLOW.read_text())
    assert isinstance(wf, dict) and wf.get("name") and isinstance(wf.get("steps"), list)
    return wf


def test_workflow_starts_four_nodes_and_installs_the_built_wasm(workflow):
    assert workflow["nodes"]["count"] == 4
    installs = [s for s in _steps(workflow["steps"]) if s["type"] == "install_application"]
    assert installs
    assert {s["path"] for s in installs} == {built_wasm_path()}


def test_workflow_calls_only_table_methods_with_their_arguments(workflow):
    table = app_methods()
    calls = [s for s in _steps(workflow["steps"]) if s["type"] == "call"]
    assert calls
    for step in calls:
        assert step["method"] in table, step["method"]
        assert sorted(step.get("args") or {}) == sorted(table[step["method"]]), step["name"]
    methods = {s["method"] for s in calls}
    assert {"register_site", "open_round"} <= methods
    opened = [s for s in calls if s["method"] == "open_round" and not s.get("expected_failure")]
    assert [s["args"]["round"] for s in opened] == [0]
    assert all(isinstance(json.loads(s["args"]["manifest"]), dict) for s in opened)


def test_workflow_inits_the_context_with_the_coordinator(workflow):
    (create,) = [s for s in _steps(workflow["steps"]) if s["type"] == "create_context"]
    params = json.loads(re.sub(r"\{\{\s*(\w+)\s*\}\}", r"\1", create["params"]))
    assert sorted(params) == app_methods()["init"]


def test_workflow_prints_urls_and_context_id(workflow):
    (script,) = [s for s in _steps(workflow["steps"]) if s["type"] == "script"]
    path = ROOT / script["script"]
    assert os.access(path, os.X_OK), path
    assert "{{context_id}}" in script["args"]
    assert sum(str(a).startswith("http://") for a in script["args"]) == 4
