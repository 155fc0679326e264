"""conftest for timm's own ``tests/test_models.py`` run against the ``hfactory_*`` timm models.

tests/test_timm_contract.py copies this file as ``conftest.py`` next to ``test_models.py`` taken
from the sdist of the installed timm, and runs pytest there in a subprocess. (It is not named
``conftest.py`` here, so that the main test run never loads it: it patches timm globally.)

``test_models.py`` computes its parametrize lists at import time from ``timm.list_models`` /
``timm.list_pretrained`` (imported by name), so both are patched here, before it is imported
(reference/interop.md section 2, route (b)):

- only ``hfactory_*`` models are listed, with timm's ``pretrained`` / ``name_matches_cfg`` /
  ``include_tags`` / ``exclude_filters`` semantics kept (none has weights, so the pretrained tests
  get none);
- listings by ``module`` (``FEAT_INTER_FILTERS``: forward_intermediates, the getter features and
  the prune contract) include every hfactory model: every hfactory encoder implements timm's
  ``forward_intermediates`` / ``prune_intermediate_layers`` (timm matches module names exactly,
  so they would otherwise never see an external model);
- the ``NON_STD_FILTERS`` listing (``test_model_default_cfgs_non_std``) includes every hfactory
  model as well: the relaxed config test then covers the models' API checks that follow the
  standard test's unpooled-head step (see ``KNOWN_BUGS``);
- any other name filter (tests written for one timm family, e.g. ``'efficientnet_[hx]_*'``) is
  applied as is and lists no hfactory model. Items that do not test an hfactory model are
  deselected.

Which tests run on which model, and why the others do not, is in contract_selection.py (copied
next to this file): exclusions per test and family with their reasons, known hfactory defects
(strict xfail) and the heavy tests run on one preset per family. Everything else timm applies
to an external model must pass.
"""

from __future__ import annotations

import fnmatch
import importlib

import pytest
import timm
import timm.models._registry as _registry
import torch
from contract_selection import KNOWN_BUGS, lookup, why_not  # copied next to this file

import hfactory.timm  # noqa: F401  (registers the hfactory_* models)

OURS = "hfactory_*"

_list_models = _registry.list_models
_list_pretrained = _registry.list_pretrained


def _is_non_std_listing(filter) -> bool:
    """test_models.py's ``NON_STD_FILTERS`` (the only list of family globs it passes as ``filter``)."""
    return isinstance(filter, (list, tuple)) and "vit_*" in filter and "hiera_*" in filter


def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                include_tags=None):
    """timm.list_models restricted to hfactory's models (see the module docstring)."""
    if module or _is_non_std_listing(filter):
        filter = OURS
    names = _list_models(filter or OURS, "", pretrained, exclude_filters, name_matches_cfg, include_tags)
    return [n for n in names if fnmatch.fnmatch(n, OURS)]


def list_pretrained(filter="", exclude_filters=""):
    return [n for n in _list_pretrained(filter, exclude_filters) if fnmatch.fnmatch(n, OURS)]


timm.list_models = list_models
timm.list_pretrained = list_pretrained
timm.models.list_models = list_models
timm.models.list_pretrained = list_pretrained

torch.set_num_threads(2)  # as tests/conftest.py: predictable on shared 2-core machines


def _model(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("model_name") if callspec is not None else None


def pytest_collection_modifyitems(config, items):
    """Keep the tests of hfactory models that contract_selection selects; mark its known bugs."""
    keep, dropped, reasons = [], [], []
    for item in items:
        model = _model(item)
        if not isinstance(model, str) or not fnmatch.fnmatch(model, OURS):
            dropped.append(item)  # a test of timm's own models
            continue
        reason = why_not(item.originalname, model)
        if reason is not None:
            dropped.append(item)
            reasons.append(f"{item.name}: {reason}")
            continue
        bug = lookup(KNOWN_BUGS, item.originalname, model)
        if bug is not None:
            reason, raises = bug
            module, name = raises.split(":")
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True,
                                              raises=getattr(importlib.import_module(module), name)))
        keep.append(item)
    items[:] = keep
    config.hook.pytest_deselected(items=dropped)
    config._hfactory_not_run = reasons


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    reasons = getattr(config, "_hfactory_not_run", [])
    if reasons:
        terminalreporter.section("hfactory models: tests not run (contract_selection.py)")
        for line in reasons:
            terminalreporter.write_line(line)
