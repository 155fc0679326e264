"""Reliability of what is written and read (issue 5): safe weight loading, checkpoints refused for
another spec, writers killed mid-write, determinism of builds and plans across processes."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hfactory
from hfactory import from_pretrained, load_spec, resolve
from hfactory.encoder import SPEC_NAME, WEIGHTS_NAME, HierarchicalEncoder, spec_hash
from hfactory.presets import list_models, load_preset
from hfactory.train.checkpoint import STATE_NAME, find_checkpoint, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hfactory"
SMALL = {"img_size": 32, "num_classes": 5, "stages": [{"embedding": 16, "num_heads": 2, "patch_size": 4},
                                                     {"embedding": 32, "num_heads": 2}]}


def small_model(data: dict = SMALL) -> HierarchicalEncoder:
    return hfactory.build_encoder(data)


# ------------------------------------------------------------------------ safe loading only

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def test_every_torch_load_in_the_package_is_weights_only():
    """The package loads weights with safetensors, and anything else with torch.load(weights_only=True)
    (no pickled code); no pickle/marshal/dill/jit loading at all."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name == "load" and owner == "torch":
                flags = {k.arg: k.value for k in node.keywords}
                assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, \
                    f"{where}: torch.load without weights_only=True"
                found.append(where)
            assert not (owner in ("pickle", "marshal", "dill", "cloudpickle") and name in ("load", "loads")), \
                f"{where}: {owner}.{name} can run code from a file"
            assert not (owner == "jit" and name == "load"), f"{where}: torch.jit.load runs code"
            if name == "load" and owner in ("np", "numpy"):
                flags = {k.arg: k.value for k in node.keywords}
                assert not (isinstance(flags.get("allow_pickle"), ast.Constant) and flags["allow_pickle"].value), where
    assert found, "expected at least the training checkpoint's torch.load (the test must be able to fail)"


class _Exploit:
    """Unpickling this runs ``open(marker, 'w')`` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_with_a_pickled_exploit_is_refused(tmp_path):
    model = small_model()
    h = spec_hash(model.spec)
    ckpt = save_checkpoint(tmp_path, model, {"step": 3, "spec_hash": h})
    assert load_checkpoint(ckpt, small_model(), h)["step"] == 3  # the honest checkpoint loads
    marker = tmp_path / "pwned"
    torch.save({"step": 3, "spec_hash": h, "payload": _Exploit(marker)}, ckpt / STATE_NAME)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(ckpt, small_model(), h)
    assert not marker.exists()


def test_pickled_weights_in_place_of_safetensors_are_refused(tmp_path):
    model = small_model()
    model.save_pretrained(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / WEIGHTS_NAME).write_bytes(pickle.dumps({"weights": _Exploit(marker)}))
    from safetensors import SafetensorError

    with pytest.raises(SafetensorError, match="header"):
        from_pretrained(tmp_path)
    assert not marker.exists()


def test_a_checkpoint_of_another_spec_is_refused_with_a_message(tmp_path):
    model = small_model()
    ckpt = save_checkpoint(tmp_path, model, {"step": 1, "spec_hash": spec_hash(model.spec)})
    other = small_model({**SMALL, "num_classes": 6})
    with pytest.raises(ValueError, match="spec hash") as info:
        load_checkpoint(ckpt, other, spec_hash(other.spec))
    assert spec_hash(other.spec) in str(info.value) and "cannot be resumed" in str(info.value)
    # also when only the spec file next to the weights was edited
    (ckpt / SPEC_NAME).write_text(hfactory.dump_spec(other.spec), encoding="utf-8")
    with pytest.raises(ValueError, match="spec hash"):
        load_checkpoint(ckpt, model, spec_hash(model.spec))


# -------------------------------------------------------------- writers killed mid-write

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    import hfactory
    from hfactory.encoder import spec_hash
    from hfactory.train.checkpoint import save_checkpoint
    out, first = Path(sys.argv[1]), int(sys.argv[2])
    spec = hfactory.load_spec(sys.argv[3])
    torch.set_num_threads(1)
    model = hfactory.HierarchicalEncoder(spec)
    for step in range(first, first + 10_000):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        print("begin", step, flush=True)
        save_checkpoint(out, model, {"step": step, "spec_hash": spec_hash(spec)})
        model.save_pretrained(out / "pretrained")
        print("done", step, flush=True)
""")

# ~8.5 M parameters (34 MB of weights): each save takes long enough for a kill to land inside it.
BIG = json.dumps({"img_size": 32, "num_classes": 10, "defaults": {"num_heads": 8},
                  "stages": [{"embedding": 512, "depth": 3, "patch_size": 4}]})


def _uniform_step(weights: dict) -> int:
    """The step a save wrote (every weight filled with it); fails if tensors of two saves mix."""
    values = set()
    for v in weights.values():
        flat = v.detach().flatten()
        assert bool((flat == flat[0]).all()), "a tensor mixes two saves"
        values.add(float(flat[0]))
    assert len(values) == 1, f"weights of several saves: {sorted(values)}"
    return int(values.pop())


def _check_directory(out: Path, done: int, spec) -> int:
    """Everything under its final name loads and belongs to one complete save; returns its step."""
    ckpt = find_checkpoint(out)
    assert ckpt is not None, "no complete checkpoint left"
    model = HierarchicalEncoder(spec)
    state = load_checkpoint(ckpt, model, spec_hash(spec))  # refuses a checkpoint whose parts disagree
    step = _uniform_step(load_file(str(ckpt / WEIGHTS_NAME)))
    assert state["step"] == step, "state and weights from different saves"
    assert step in (done, done + 1), f"checkpoint of step {step}, but step {done} was the last completed save"
    for name in (WEIGHTS_NAME, SPEC_NAME, STATE_NAME):  # nothing half-written under a final name
        assert (ckpt / name).is_file()
    pretrained = out / "pretrained"
    if (pretrained / WEIGHTS_NAME).exists():
        reloaded = from_pretrained(pretrained)
        assert _uniform_step(reloaded.state_dict()) in (done, done + 1)
    visible = {p.name for p in pretrained.iterdir() if not p.name.startswith(".")} if pretrained.exists() else set()
    assert visible <= {WEIGHTS_NAME, SPEC_NAME}, visible
    return step


def _kill_writers(tmp_path: Path, kills: int, seed: int) -> tuple[list[int], int]:
    out = tmp_path / "run"
    spec = load_spec(BIG)
    rng = random.Random(seed)
    steps, first, interrupted = [], 0, 0
    for _ in range(kills):
        before = _traces(out)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(first), BIG], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        try:
            # let one save complete, then kill at a random moment of a later one (a save takes ~0.2 s)
            saves = rng.randint(1, 3)
            while sum(line.startswith("begin") for line in lines) <= saves:
                lines.append(proc.stdout.readline())
                assert lines[-1], proc.stderr.read()
            time.sleep(rng.uniform(0.0, 0.25))
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        lines += rest.splitlines()
        done = max(int(line.split()[1]) for line in lines if line.startswith("done"))
        interrupted += bool(_traces(out) - before)
        step = _check_directory(out, done, spec)
        steps.append(step)
        first = step + 1  # the next writer continues from what was found, as a resumed run does
    return steps, interrupted


def _traces(out: Path) -> set:
    """Traces of writes in progress: temporary files, a half-swapped checkpoint directory."""
    return {p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith((".new", ".old"))} \
        if out.exists() else set()


def test_spec_hash_ignores_default_fields_so_a_later_version_loads_old_checkpoints():
    """Spelling defaults out does not change the hash, nor does a spec model that gained a field
    with a default (a later hfactory reading a checkpoint saved before it); any real change does."""
    from hfactory.spec.model import EncoderSpec

    spec = load_preset("caformer_s18")
    full = spec.model_dump(mode="json")  # every field, defaults included
    assert spec_hash(load_spec(full)) == spec_hash(spec)

    class LaterEncoderSpec(EncoderSpec):  # a future version's model with one more (default) field
        future_option: int = 0

    later = LaterEncoderSpec.model_validate(full)
    assert later.future_option == 0 and spec_hash(later) == spec_hash(spec)
    assert spec_hash(LaterEncoderSpec.model_validate({**full, "future_option": 1})) != spec_hash(spec)

    base = load_spec(SMALL)
    assert spec_hash(base.with_changes({"drop_path_rate": 0.1})) != spec_hash(base)
    assert spec_hash(base.with_changes({"stages.0.depth": 3})) != spec_hash(base)
    # the same default options under another kind: the kind alone must separate them
    pooled = base.with_changes({"stages.*.token_mixer": {"kind": "pooling"}})
    plain = base.with_changes({"stages.*.token_mixer": {"kind": "identity"}})
    assert spec_hash(pooled) != spec_hash(plain)


def test_files_saved_with_the_first_hash_and_lineage_format_still_load(tmp_path):
    """Before spec_hash covered non-default fields only (and lineage recorded steps), hfactory
    wrote SHA-256 of the full dump and lineage {base, changes, rule}. The two hashes below were
    written by that code (commit 6d5504a) for caformer_s18 and for it with stages.3.depth = 2."""
    from hfactory.io import save_model_dir, spec_hashes
    from hfactory.models import load_model

    plain = load_preset("caformer_s18")
    assert "d3883d15d1d0f967" in spec_hashes(plain)
    old = plain.with_changes({"stages.3.depth": 2}).model_dump(mode="json", exclude_none=True)
    old["lineage"] = {"base": "caformer_s18", "changes": {"stages.3.depth": 2}}  # the first format
    variant = load_spec(old)
    assert [s.changes for s in variant.lineage.steps] == [{"stages.3.depth": 2}]
    assert "45838fd6ea3f1f0e" in spec_hashes(variant)
    # a save_pretrained directory whose weights carry an old-format hash loads
    model = small_model()
    directory = save_model_dir(model, tmp_path / "m")
    legacy = next(h for h in spec_hashes(model.spec) if h != spec_hash(model.spec))
    from safetensors.torch import save_file

    save_file(load_file(str(directory / WEIGHTS_NAME)), str(directory / WEIGHTS_NAME),
              metadata={"spec_hash": legacy, "format": "pt"})
    assert load_model(directory).spec == model.spec
    save_file(load_file(str(directory / WEIGHTS_NAME)), str(directory / WEIGHTS_NAME),
              metadata={"spec_hash": "0123456789abcdef", "format": "pt"})
    with pytest.raises(ValueError, match="was saved for spec hash 0123456789abcdef"):
        load_model(directory)


def test_a_writer_killed_mid_write_leaves_a_complete_checkpoint(tmp_path):
    """SIGKILL a real process saving ~34 MB checkpoints (save_checkpoint and save_pretrained, each
    file atomic) at random moments, 4 times: every time the directory holds one complete
    checkpoint of the last or the next save, and nothing partial under a final name."""
    steps, interrupted = _kill_writers(tmp_path, kills=4, seed=5)
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    print(f"{interrupted} of 4 kills interrupted a write")


@pytest.mark.slow
def test_a_writer_killed_mid_write_many_times(tmp_path):
    steps, interrupted = _kill_writers(tmp_path, kills=25, seed=11)
    assert len(set(steps)) == len(steps)
    assert interrupted >= 5, f"only {interrupted} of 25 kills landed inside a write"


# --------------------------------------------------------------------------- determinism

def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def test_same_spec_and_seed_build_identical_weights():
    torch.manual_seed(123)
    a = _weights_digest(small_model())
    torch.manual_seed(123)
    b = _weights_digest(small_model())
    torch.manual_seed(124)
    c = _weights_digest(small_model())
    assert a == b != c


def test_resolving_twice_gives_the_same_plan_text_and_json():
    from hfactory.plan import _resolve  # uncached: resolve() memoises on the spec's JSON

    for name in list_models():
        spec = load_preset(name)
        again = load_spec(hfactory.dump_spec(spec))  # through YAML and back
        a, b = resolve(spec), _resolve(again, again.img_hw)
        assert a is not b and str(a) == str(b) and a.to_json() == b.to_json() and a == b, name


FINGERPRINT = textwrap.dedent("""
    import hashlib, json, sys, torch, hfactory
    from hfactory.encoder import spec_hash
    from hfactory.presets import list_models, load_preset
    torch.set_num_threads(1)
    out = {}
    for name in list_models():
        spec = load_preset(name)
        plan = hfactory.resolve(spec)
        out[name] = [hashlib.sha256(str(plan).encode()).hexdigest(), hashlib.sha256(plan.to_json().encode()).hexdigest(),
                     spec_hash(spec), hfactory.dump_spec(spec)]
    torch.manual_seed(7)
    model = hfactory.build_encoder(json.loads(sys.argv[1]))
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode()); digest.update(tensor.contiguous().numpy().tobytes())
    out["weights"] = digest.hexdigest()
    print(json.dumps(out, sort_keys=True))
""")


def test_plans_hashes_and_seeded_weights_agree_across_processes():
    """Different PYTHONHASHSEEDs (set and dict orders) give the same plan text, plan JSON, spec
    hash, dumped YAML and seeded weights, for every preset."""
    runs = []
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", FINGERPRINT, json.dumps(SMALL)], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        runs.append(json.loads(run.stdout))
    assert runs[0] == runs[1]
    for name in list_models():  # and the same as in this process
        plan = resolve(load_preset(name))
        assert runs[0][name][0] == hashlib.sha256(str(plan).encode()).hexdigest(), name
        assert runs[0][name][2] == spec_hash(load_preset(name))


def test_atomic_files_get_the_umask_permissions_without_changing_it(tmp_path):
    import os

    from hfactory.atomic import atomic_path

    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "f") as tmp:
            tmp.write_text("x")
        assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
        assert os.umask(0o027) == 0o027  # still the process's umask
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no stray temporary file
