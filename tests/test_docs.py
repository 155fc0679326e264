"""The documentation site (mkdocs.yml, docs/) and the README front door.

- the site builds with ``mkdocs build --strict`` (generated reference pages, preset diagrams and
  the benchmarks page included: docs/hooks.py);
- every tutorial page runs: its fenced blocks execute in order in one namespace, in a temporary
  folder holding a copy of ``examples/`` (see :func:`run_page` for the rules);
- the components tables list exactly the registry, and the CLI page every command;
- benchmark sections without full provenance carry the visible note;
- README: under 150 lines, the CI test command after its marker, the same two commands as the
  getting-started page, and links that resolve.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"

pytest.importorskip("mkdocs", reason="the docs extra (mkdocs, mkdocs-material, mkdocstrings-python) is not installed")


def _hooks():
    spec = importlib.util.spec_from_file_location("hfactory_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _hooks()

# --------------------------------------------------------------------------- page runner

FENCE = re.compile(r"^```(\S*)(.*)$")
SKIP = "<!-- docs-test: skip -->"
#: pages whose code is executed (getting started and every tutorial)
RUN_PAGES = ["getting-started.md", *sorted(f"tutorials/{p.name}" for p in (DOCS / "tutorials").glob("*.md")),
             "guide/backbone.md", "presets/thesis.md"]


def code_blocks(text: str) -> list[tuple[str, dict, str, bool]]:
    """``(language, attributes, code, skipped)`` of every top-level fenced block of a page.

    Attributes are ``key="value"`` pairs of the info string (``title="tiny.yaml"``); a block is
    skipped when the line before its fence is ``<!-- docs-test: skip -->``."""
    out = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, rest = m.group(1), m.group(2)
        attrs = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        skipped = i > 0 and lines[i - 1].strip() == SKIP
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        out.append((lang, attrs, "\n".join(body) + "\n", skipped))
        i += 1
    return out


def run_shell_block(code: str, where: str) -> None:
    """Run every line of a ``bash`` block as an in-process ``hfactory`` command (exit status 0
    required). Lines that are not ``hfactory`` commands make the test fail: mark such blocks
    with ``<!-- docs-test: skip -->``."""
    from hfactory.cli import main

    for line in code.splitlines():
        line = line.split(" #")[0].strip()
        if not line:
            continue
        argv = shlex.split(line)
        if argv[0] in (".venv/bin/hfactory", "hfactory"):
            assert main(argv[1:]) == 0, f"{where}: `{line}` failed"
        else:
            pytest.fail(f"{where}: `{line}` is not an hfactory command; mark the block with {SKIP}")


def run_page(page: str, workdir: Path) -> None:
    """Execute ``page``'s blocks in order: ``python`` in one namespace, ``yaml`` blocks with a
    ``title`` written to that file, ``bash`` as hfactory commands; other languages are shown
    only. Runs with ``workdir`` (holding a copy of ``examples/``) as the current directory."""
    blocks = code_blocks((DOCS / page).read_text(encoding="utf-8"))
    namespace: dict = {"__name__": "__docs__"}
    for n, (lang, attrs, code, skipped) in enumerate(blocks):
        where = f"{page} block {n} ({lang})"
        if skipped:
            continue
        if lang == "python":
            exec(compile(code, where, "exec", dont_inherit=True), namespace)  # no __future__ flags of this file
        elif lang == "yaml" and "title" in attrs:
            (workdir / attrs["title"]).write_text(code, encoding="utf-8")
        elif lang == "bash":
            run_shell_block(code, where)


@pytest.fixture()
def docs_workdir(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield tmp_path
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.mark.parametrize("page", RUN_PAGES)
def test_tutorial_page_runs(page, docs_workdir, monkeypatch):
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    # Training uses every core by default; on CI's shared cores a 2-thread op stalls whenever one of
    # its threads is descheduled (10-100x slower under load), so the pages run on one thread.
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_threads(1))
    set_threads(1)
    try:
        run_page(page, docs_workdir)
    finally:
        set_threads(threads)


def test_tutorial_pages_have_code():
    for page in RUN_PAGES:
        langs = [lang for lang, _, _, skipped in code_blocks((DOCS / page).read_text()) if not skipped]
        assert "python" in langs or "bash" in langs, f"{page} has no executed code"


def test_code_blocks_parser():
    text = 'x\n```python\na = 1\n```\n<!-- docs-test: skip -->\n```bash\npip install x\n```\n```yaml title="s.yaml"\nk: 1\n```\n'
    assert code_blocks(text) == [("python", {}, "a = 1\n", False), ("bash", {}, "pip install x\n", True),
                                 ("yaml", {"title": "s.yaml"}, "k: 1\n", False)]


# --------------------------------------------------------------------------- site build

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()
    for page in ("getting-started", "reference/components", "reference/cli", "reference/spec-fields", "benchmarks",
                 "presets/hiera", "reference/api/registry"):
        assert (site / page / "index.html").is_file(), page


def test_site_has_a_diagram_for_every_preset(site):
    from hfactory import list_models

    for name in list_models():
        svg = site / "diagrams" / f"{name}.svg"
        assert svg.is_file(), name
        assert "stage 0" in svg.read_text()
    pages = "".join(p.read_text() for p in (site / "presets").rglob("index.html"))
    for name in list_models():
        assert f"diagrams/{name}.svg" in pages, f"{name}'s diagram is on no preset page"


def test_site_components_page_lists_every_component(site):
    html = (site / "reference" / "components" / "index.html").read_text()
    for slot, name in hooks.registered_components():
        assert f'id="{slot}-{name.replace("_", "-")}"' in html, (slot, name)


# --------------------------------------------------------------------------- generated tables

def test_components_table_is_the_registry():
    rows = hooks.components_in_markdown(hooks.components_markdown())
    assert sorted(rows) == sorted(hooks.registered_components())
    assert ("token_mixer", "cluster_attention") in rows
    assert len(rows) == len(set(rows))


def test_components_table_follows_new_registrations():
    from pydantic import Field
    from typing import Literal

    from hfactory import registry
    from hfactory.spec.protocol import FeedforwardParams

    class DocsTestParams(FeedforwardParams):
        """A feedforward registered by the docs test."""

        kind: Literal["docs_test_ffn"] = "docs_test_ffn"
        width: int = Field(3, ge=1, description="a documented option")

    registry.register("feedforward", "docs_test_ffn", DocsTestParams, "torch.nn:Identity")
    try:
        text = hooks.components_markdown()
        assert ("feedforward", "docs_test_ffn") in hooks.components_in_markdown(text)
        assert "a documented option" in text
    finally:
        registry.unregister("feedforward", "docs_test_ffn")


def test_readme_components_table_if_any_is_the_registry():
    text = README.read_text()
    if "| slot | kind" in text:
        assert sorted(hooks.components_in_markdown(text)) == sorted(hooks.registered_components())


def test_cli_page_documents_every_command():
    text = hooks.cli_markdown()
    for name in hooks.cli_commands():
        assert f"## hfactory {name}\n" in text
    assert "diagram" in hooks.cli_commands()


def test_spec_fields_page_documents_stage_shortcuts():
    text = hooks.spec_fields_markdown()
    for word in ("patch_size", "stride", "padding", "embedding", "mask_unit_size", "num_classes"):
        assert f"`{word}`" in text


def test_every_preset_is_on_one_family_page():
    hooks.check_preset_pages(DOCS)  # raises ValueError: unknown names, presets on two pages
    # presets added without a family page are listed on the overview; the shipped ones all have one
    known = {"poolformer_s12", "poolformerv2_s12", "convformer_s18", "caformer_s18", "swin_tiny_patch4_window7_224",
             "swinv2_tiny_window8_256", "hiera_tiny_224", "hiera_small_abswin_256", "mae_hiera_tiny_224",
             "sam2_hiera_tiny", "pvt_v2_b0", "hvt_ti_1", "hvt_s_0", "hvt_s_1", "hvt_s_2", "hvt_s_3", "hvt_s_4"}
    assert not known & set(hooks.unassigned_presets(DOCS))


# --------------------------------------------------------------------------- benchmarks provenance

def test_provenance_check():
    full = ("- Date: 2026-12-03; AMD EPYC (avx2), 2 threads, torch 2.14.1\n"
            "Reproduce: `.venv/bin/python benchmarks/x.py`\n| a | 1.0 s |")
    assert hooks.provenance_missing(full) == []
    assert hooks.provenance_missing("| a | 1.0 s | 2026-01-01") == ["CPU model", "vector extensions", "threads",
                                                                   "torch version", "reproducing command"]
    page = hooks.benchmarks_markdown("# R\n\n## Good\n\n" + full + "\n\n## Bad\n\n| x | 3.0 s |\n")
    good, bad = page.split("## Bad")
    assert hooks.NOTE_TITLE not in good.split("## Good")[1]
    assert hooks.NOTE_TITLE in bad


def test_every_recorded_figure_names_its_machine():
    """Every section of RESULTS.md with a table names the CPU model, its vector extensions, the
    threads, the torch version, the date and the reproducing command (or is marked as holding
    machine-independent counts only), so the docs page carries no "not re-measured" note."""
    sections = hooks.split_sections((ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8"))
    parent = ""
    checked = 0
    for level, heading, body in sections:
        if level == 2:
            parent = body
        if level < 2 or "|---" not in body:
            continue
        checked += 1
        missing = hooks.provenance_missing(body, parent if level == 3 else "")
        assert not missing or hooks.MACHINE_INDEPENDENT in body, (heading, missing)
    assert checked >= 10
    assert f'!!! warning "{hooks.NOTE_TITLE}"' not in hooks.benchmarks_markdown()


# --------------------------------------------------------------------------- README

def _test_command(text: str) -> str:
    """The command .ci/run extracts: the fenced lines after ``<!-- test-command -->``."""
    after = text.split("<!-- test-command -->", 1)[1]
    m = re.search(r"```\w*\n(.*?)```", after, re.S)
    return m.group(1).strip()


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) < 150
    assert "## Two commands" in text
    cmd = _test_command(text)
    assert "pip install -e '.[test]'" in cmd and "pytest" in cmd


def test_readme_commands_match_getting_started():
    readme = [c for lang, _, c, _ in code_blocks(README.read_text()) if lang == "bash"]
    started = [c for lang, _, c, _ in code_blocks((DOCS / "getting-started.md").read_text()) if lang == "bash"]
    assert readme[:2] == started[:2]


def test_readme_links_resolve():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) + re.findall(r'src="([^"]+)"', text)
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, "README links into the docs"
    for t in local:
        assert (ROOT / t).exists(), t


def test_docs_extra_is_in_test_extra():
    tomllib = pytest.importorskip("tomllib")

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = lambda reqs: {re.split(r"[<>=\[ ]", r)[0].lower() for r in reqs}  # noqa: E731
    assert names(extras["docs"]) <= names(extras["test"])


def test_readme_spec_is_the_example(docs_workdir):
    from hfactory import load_spec

    yaml_blocks = [c for lang, _, c, _ in code_blocks(README.read_text()) if lang == "yaml"]
    assert load_spec(yaml_blocks[0]) == load_spec(ROOT / "examples" / "digits_hybrid.yaml")


def test_readme_python_runs(docs_workdir):
    namespace: dict = {"__name__": "__readme__"}
    for lang, _, code, skipped in code_blocks(README.read_text()):
        if lang == "python" and not skipped:
            exec(compile(code, "README.md", "exec", dont_inherit=True), namespace)
