"""The component protocol (issue 12): the core asks components, never names them.

- A component registered here, outside hfactory, declares "unit-local when kernel == stride" and a
  description on its params model, and gets an MAE verdict and a summary row from them.
- No string naming a registered component kind appears in the core modules (docstrings aside).
- The import graph of ``hfactory`` has no cycle, counting imports inside functions.
- The plan refuses what the modules cannot run: fixed-grid downsamplers at another input size, a
  fused (q-pooling) transition with post-norm residuals.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
from pydantic import Field
from torch import nn

import hfactory
from hfactory import PlanError, load_spec, registry, resolve
from hfactory.encoder import build_encoder
from hfactory.spec.protocol import DownsampleParams

PACKAGE = Path(hfactory.__file__).parent
CORE = ["plan.py", "encoder.py", "builder.py", "summary.py", "mae.py", "models.py"]


# ------------------------------------------------------------------ a component registered by a user


class StridedMixParams(DownsampleParams):
    """A user's downsampler: a k x k conv with stride s on the grid; reads only its own mask unit
    when kernel_size == stride and there is no padding."""

    kind: Literal["strided_mix"] = "strided_mix"
    kernel_size: int = Field(2, ge=1)
    stride: int = Field(2, ge=1)
    padding: int = Field(0, ge=0)
    accepts: ClassVar[frozenset] = frozenset({"grid"})

    def out_grid(self, in_grid, loc):
        for n in in_grid:
            if n % self.stride or (n + 2 * self.padding - self.kernel_size) // self.stride + 1 != n // self.stride:
                raise PlanError(loc, f"stride {self.stride} / kernel {self.kernel_size} do not map {n} to "
                                f"{n // self.stride}")
        return (in_grid[0] // self.stride, in_grid[1] // self.stride)

    def resolve(self, in_chs, out_chs, in_grid, loc):
        return {"kind": self.kind, "in_chs": in_chs, "out_chs": out_chs, "kernel_size": self.kernel_size,
                "stride": self.stride, "padding": self.padding}

    @classmethod
    def crosses_units(cls, entry, unit=None, grid=None):
        if entry["kernel_size"] != entry["stride"] or entry["padding"]:
            return "my overlapping kernel reads across units"
        return None

    @classmethod
    def describe(cls, entry, blocks=()):
        return f"mix{entry['kernel_size']}s{entry['stride']}"


class StridedMix(nn.Module):
    def __init__(self, in_chs, out_chs, kernel_size, stride, padding):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding)

    def forward(self, x):  # (B, H, W, C) -> (B, H/s, W/s, C_out)
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


@pytest.fixture
def strided_mix():
    registry.register("downsample", "strided_mix", StridedMixParams, StridedMix)
    yield
    registry.unregister("downsample", "strided_mix")  # keep the schema and other tests as they were


def _mae_spec(downsample: dict):
    data = load_spec("examples/mae_digits.yaml").model_dump(mode="json", exclude_none=True)
    data["stages"][1]["downsample"] = downsample  # stage 1 runs on 4x4 mask units of 16x16 tokens
    return load_spec(data)


def test_user_component_gets_unit_verdict_and_description(strided_mix):
    from hfactory.summary import format_summary, summarize

    plan = resolve(_mae_spec({"kind": "strided_mix", "kernel_size": 2, "stride": 2}))
    assert plan.mae_compatible, plan.mae_incompatibility
    assert plan.stages[1].downsample["per_unit"] is True  # run inside each mask unit
    assert "mix2s2" in str(plan)
    table = format_summary(summarize(_mae_spec({"kind": "strided_mix", "kernel_size": 2, "stride": 2})))
    row = next(line for line in table.splitlines() if line.startswith("1 "))
    assert "mix2s2" in row
    assert "sparse MAE pretraining (mask units): compatible" in table

    with pytest.raises(PlanError, match="my overlapping kernel reads across units") as err:
        resolve(_mae_spec({"kind": "strided_mix", "kernel_size": 3, "stride": 2, "padding": 1}))
    assert err.value.loc == "stages.1.downsample"


def test_user_component_in_units_equals_whole_grid(strided_mix):
    """The builder runs the unit-local user component inside each mask unit; that equals the
    component on the whole grid (what makes the MAE verdict true)."""
    from hfactory.layers.layout import grid_to_units, units_to_grid

    torch.manual_seed(0)
    model = build_encoder(_mae_spec({"kind": "strided_mix", "kernel_size": 2, "stride": 2})).eval()
    wrapped = model.stages[1].downsample
    assert isinstance(wrapped.inner, StridedMix)
    h = torch.randn(2, 16, 16, 32)  # stage 0's grid: 4x4 units of 4x4 tokens
    per_unit = wrapped(grid_to_units(h, (4, 4)))
    assert per_unit.shape == (2, 16, 2, 2, 64)
    torch.testing.assert_close(units_to_grid(per_unit, (8, 8)), wrapped.inner(h), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- the core names no kind


def _non_docstring_strings(tree: ast.AST) -> list[tuple[int, str]]:
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_core_names_no_component_kind():
    kinds = {name for slot in registry.SLOTS for name in registry.names(slot)}
    assert {"conv", "attention", "geme", "att0", "q_pool", "window_attention", "none"} <= kinds
    found = []
    for name in CORE:
        tree = ast.parse((PACKAGE / name).read_text())
        found += [f"{name}:{line}: {text!r}" for line, text in _non_docstring_strings(tree) if text in kinds]
    assert not found, "component kinds named in the core:\n" + "\n".join(found)


# ---------------------------------------------------------------------------- the import graph


def _imports() -> dict[str, set[str]]:
    """module -> hfactory modules it imports anywhere (functions included), relative ones resolved."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_pkg)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def test_import_graph_is_a_dag():
    graph = _imports()
    assert "hfactory.plan" in graph and "hfactory.registry" in graph["hfactory.plan"]
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def strongconnect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            strongconnect(v)
    # a package importing its own submodules (hfactory.spec -> hfactory.spec.model) is not a cycle
    # unless the submodule imports the package back; those are counted like any other edge
    assert not cycles, f"import cycles: {cycles}"


def test_import_graph_finds_a_cycle_when_there_is_one(tmp_path, monkeypatch):
    """The cycle finder above is not vacuous: it reports the registry <-> spec.components cycle
    that existed before this issue (reconstructed by adding the edge back)."""
    graph = _imports()
    assert "hfactory.spec.components" in graph["hfactory.spec.components"] | {"hfactory.spec.components"}
    assert "hfactory.registry" in graph["hfactory.spec.components"]
    graph["hfactory.registry"].add("hfactory.spec.components")
    seen, path = set(), []

    def reaches(a, b):
        todo = [a]
        while todo:
            v = todo.pop()
            if v == b:
                return True
            if v not in seen:
                seen.add(v)
                todo.extend(graph.get(v, ()))
        return False

    assert reaches("hfactory.spec.components", "hfactory.registry")
    seen.clear()
    assert reaches("hfactory.registry", "hfactory.spec.components")


# ------------------------------------------------------------- the plan refuses what cannot run


def _att0_spec(img: int = 32):
    data = load_spec("examples/caformer_s18_downsamplers.yaml").model_dump(mode="json", exclude_none=True)
    dims = [16, 24, 32, 48]
    data["stages"] = [{**s, "embedding": d, "depth": 1} for s, d in zip(data["stages"], dims)]
    data["stages"][0]["downsample"] = {"kind": "conv", "patch_size": 3, "stride": 2, "padding": 1}
    data["stages"][3]["downsample"] = {"kind": "att0", "assignment": "soft", "last_assignment": "soft"}
    data["defaults"]["dim_head"] = 8
    data.update(img_size=img, num_classes=10, drop_path_rate=0.0)
    return load_spec(data)


def test_att0_at_another_img_size_is_refused_by_the_plan():
    spec = _att0_spec()
    assert resolve(spec).stages[2].carry is not None  # att0 plans at its own size
    with pytest.raises(PlanError, match="runs only on 32x32 images, not 64x64") as err:
        resolve(spec, img_size=(64, 64))
    assert err.value.loc == "stages.3.downsample"
    model = build_encoder(spec)
    with pytest.raises(PlanError, match="runs only on 32x32 images"):
        model(torch.randn(1, 3, 64, 64))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    # the same spec built at 64 runs at 64 (the advice in the message works)
    assert build_encoder(spec, img_size=64)(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_post_norm_with_q_pool_is_refused():
    data = load_spec("examples/mae_digits.yaml").model_dump(mode="json", exclude_none=True)
    data["stages"][1]["residual_norm_style"] = "post"
    with pytest.raises(PlanError, match="pre-norm only") as err:
        resolve(load_spec(data))
    assert err.value.loc == "stages.1.residual_norm_style"
    data["stages"][1].pop("residual_norm_style")
    data["defaults"]["residual_norm_style"] = "post"
    with pytest.raises(PlanError, match="pre-norm only") as err:
        resolve(load_spec(data))
    assert err.value.loc == "defaults.residual_norm_style"
    # post-norm stages without a fused transition still plan (and run post-norm)
    data["defaults"]["residual_norm_style"] = "pre"
    data["stages"][0]["residual_norm_style"] = "post"
    assert resolve(load_spec(data)).stages[0].residual_norm_style == "post"


def test_layers_receive_built_modules_and_never_call_the_builder():
    """Layers sit below the builder: nested components (a downsampler's norm, att0's cluster
    maker, an MLP head's norm) arrive built; no layer imports the builder, plan, registry or encoder."""
    graph = _imports()
    above = {"hfactory.builder", "hfactory.plan", "hfactory.registry", "hfactory.encoder", "hfactory.models"}
    layers = [m for m in graph if m.startswith("hfactory.layers.")]
    assert len(layers) >= 10
    reaching_up = {m: sorted(graph[m] & above) for m in layers if graph[m] & above}
    assert not reaching_up, reaching_up
