"""timm's own model contract as our peer suite: ``tests/test_models.py`` from the sdist of the
INSTALLED timm, run against every ``hfactory_*`` timm model (:mod:`hfactory.timm`).

The sdist is fetched from the package index at test time (``pip download timm==<version>
--no-binary :all: --no-deps``) into ``~/.cache/hfactory-tests`` (``$HFACTORY_TEST_CACHE``
overrides), never into the repository; without network the tests skip, saying so. Its
``test_models.py`` runs in a pytest subprocess in a temporary directory, with
``timm_contract/contract_conftest.py`` as its conftest (it restricts timm's model listings to the
``hfactory_*`` models, reference/interop.md section 2) and ``timm_contract/contract_selection.py``,
which says which test runs on which model:

- run on every preset: forward (eval at the config size, then with grad checkpointing), backward
  (every parameter gets a gradient), the default-config contract on the meta device (standard and
  relaxed), ``features_only`` (all but HVT), ``forward_intermediates`` and the getter features
  (all but HVT's ``seq`` stages);
- run on one preset per family (budget): FX forward / backward (not Hiera, as timm) and the
  ``prune_intermediate_layers`` contract;
- not run (reasons in ``contract_selection.EXCLUDED``): TorchScript (as timm's own Hiera), FX on
  Hiera, and the 2-D feature-map bounds on HVT's 1-D pooled stages;
- known hfactory defects outside the timm integration (``KNOWN_BUGS``) run as strict xfails that
  expect the defect's exception.

The inner run takes about 2-3 minutes on 2 CPU cores (the whole of it: ``contract_run`` runs once).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

timm = pytest.importorskip("timm")

HERE = Path(__file__).resolve().parent
CONTRACT = HERE / "timm_contract"
REPO = HERE.parent

_spec = importlib.util.spec_from_file_location("contract_selection", CONTRACT / "contract_selection.py")
selection = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(selection)

PYTEST_INI = """[pytest]
addopts = -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning
"""


def _cache_dir() -> Path:
    if os.environ.get("HFACTORY_TEST_CACHE"):
        return Path(os.environ["HFACTORY_TEST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hfactory-tests"


def _timm_sdist(version: str, scratch: Path) -> Path:
    """The sdist of timm ``version``: cached, else downloaded with pip (skips without network)."""
    cached = _cache_dir() / f"timm-{version}.tar.gz"
    if cached.is_file():
        return cached
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-binary", ":all:", "--no-deps",
           "--disable-pip-version-check", "-d", str(scratch)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip download of the timm {version} sdist timed out (no network?)")
    found = sorted(scratch.glob("timm-*.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-2:])
        pytest.skip(f"could not download the timm {version} sdist from the package index (no network?); "
                    f"its tests/test_models.py is the contract suite. pip: {tail}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    shutil.copyfile(found[0], partial)
    os.replace(partial, cached)  # atomic: a concurrent run sees the whole file or none
    return cached


def _extract_test_models(sdist: Path, dest: Path) -> Path:
    """``<sdist>/tests/test_models.py`` written to ``dest`` (read by member name: no extraction
    of paths from the archive)."""
    with tarfile.open(sdist, "r:gz") as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith("/tests/test_models.py")
                       and m.name.count("/") == 2), None)
        if member is None:
            pytest.fail(f"{sdist.name} has no tests/test_models.py; the contract suite moved in this timm version")
        target = dest / "test_models.py"
        target.write_bytes(tar.extractfile(member).read())
    return target


def _outcome(case: ET.Element) -> str:
    for tag in ("failure", "error"):
        if case.find(tag) is not None:
            return tag
    skipped = case.find("skipped")
    if skipped is not None:
        return "xfail" if skipped.get("type") == "pytest.xfail" else "skipped"
    return "passed"


def _model_of(name: str) -> str | None:
    params = name[name.index("[") + 1:-1].split("-") if "[" in name else []
    return next((p for p in params if p.startswith("hfactory_")), None)


@pytest.fixture(scope="module")
def contract_run(tmp_path_factory):
    """Runs the inner suite once; returns ``{(test, model): (outcome, message)}``, the output, the
    seconds it took and the names of the tests its test_models.py defines."""
    scratch = tmp_path_factory.mktemp("timm-contract")
    sdist = _timm_sdist(timm.__version__, tmp_path_factory.mktemp("timm-sdist"))
    source = _extract_test_models(sdist, scratch).read_text()
    defined = set(re.findall(r"^\s*def (test_\w+)\(", source, re.M))
    shutil.copyfile(CONTRACT / "contract_conftest.py", scratch / "conftest.py")
    shutil.copyfile(CONTRACT / "contract_selection.py", scratch / "contract_selection.py")
    (scratch / "pytest.ini").write_text(PYTEST_INI)
    report = scratch / "report.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "test_models.py", "-q", "-rfE", f"--junitxml={report}"],
                          cwd=scratch, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - start
    output = proc.stdout + proc.stderr
    if not report.is_file():
        pytest.fail(f"the inner pytest run wrote no report (exit {proc.returncode}):\n{output[-4000:]}")
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "")
        test, model = name.split("[", 1)[0], _model_of(name)
        node = next((case.find(t) for t in ("failure", "error") if case.find(t) is not None), None)
        message = (node.get("message") or "") if node is not None else ""
        results[(test, model)] = (_outcome(case), message)
    return results, output, seconds, defined


def test_timm_contract_passes(contract_run):
    """No item of the inner run fails (a strict xfail that passes fails too: the defect in
    contract_selection.KNOWN_BUGS was fixed, remove its entry)."""
    results, output, seconds, _ = contract_run
    failed = {k: v for k, v in results.items() if v[0] in ("failure", "error")}
    assert results, f"the inner run ran nothing:\n{output[-4000:]}"
    print(f"timm {timm.__version__} contract: {len(results)} tests on hfactory models in {seconds:.0f} s")
    assert not failed, (f"{len(failed)} of {len(results)} timm contract tests failed ({seconds:.0f} s):\n"
                        + "\n".join(f"  {t}[{m}]: {msg[:300]}" for (t, m), (_, msg) in sorted(failed.items()))
                        + f"\n\n{output[-6000:]}")


@pytest.mark.parametrize("test", selection.CONTRACT_TESTS)
def test_timm_contract_coverage(contract_run, test):
    """Every preset the selection names for ``test`` ran it, and nothing else did: the patched
    listings and the deselection do not silently drop (or add) models."""
    import hfactory.timm
    from hfactory.presets import list_models

    results, output, _, defined = contract_run
    if test not in defined:
        pytest.skip(f"timm {timm.__version__}'s tests/test_models.py has no {test}")
    ran = {model for (t, model) in results if t == test}
    expected = {hfactory.timm.timm_name(p) for p in list_models()}
    expected = {m for m in expected if selection.why_not(test, m) is None}
    assert ran == expected, (f"{test}: ran on {sorted(ran)}, the selection expects {sorted(expected)}; "
                             f"missing {sorted(expected - ran)}, extra {sorted(ran - expected)}")
    for model in ran:
        outcome, message = results[(test, model)]
        want = "xfail" if selection.lookup(selection.KNOWN_BUGS, test, model) else "passed"
        assert outcome == want, f"{test}[{model}]: {outcome} (expected {want}) {message[:300]}"
