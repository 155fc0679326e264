"""FSDP2 without the whole model in any process: ``torchrun --nproc_per_node=2`` (gloo, CPU).

``tests/fsdp_driver.py`` trains a wide spec (~47M parameters at img_size 32, batch 2: large
weights, tiny activations) for 2 steps with ``--fsdp`` and one sharded (DCP) checkpoint, and
measures each process's peak RSS growth over a baseline taken after the imports and the process
group (``ru_maxrss``; ``MALLOC_MMAP_THRESHOLD_`` makes glibc return large freed blocks at once,
so the peak is the live memory's, not the allocator's leftovers):

- right after the sharded build it must stay below the full model's fp32 weights (``4 P`` bytes):
  the model was never whole in the process (the old build-whole-then-shard path peaks at about
  ``6 P``: the whole model plus the shards copied from it);
- over the whole run below the fp32 weights plus AdamW's two states (``12 P``): FSDP holds about
  ``8 P / 2`` per process (weights, gradients, 2 moments) plus a couple of gathered blocks.

The same launch checks that the sharded initialisation equals the unsharded one bit for bit (and
leaves torch's RNG in the same state) for an encoder, a masked autoencoder and an SFT spec.
That the final weights equal DDP's is checked in tests/test_distributed.py (FSDP run stopped,
resumed from its sharded checkpoint with 2 FSDP processes, 2 DDP processes and 1 process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

from reference_utils import TINY_MAE  # noqa: E402
from test_distributed import TINY  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[1]

WIDE = """\
name: wide_fsdp
img_size: 32
in_chans: 1
num_classes: 10
drop_path_rate: 0.0
defaults:
  feedforward: {kind: mlp, hidden_layer_multiplier: 4}
stages:
  - {embedding: 512, depth: 6, token_mixer: attention, num_heads: 8,
     downsample: {kind: conv, patch_size: 4, stride: 4}}
  - {embedding: 768, depth: 4, token_mixer: attention, num_heads: 8}
"""


def test_fsdp_never_holds_the_whole_model(tmp_path):
    from hfactory.models import build

    (tmp_path / "wide.yaml").write_text(WIDE, encoding="utf-8")
    (tmp_path / "tiny.yaml").write_text(TINY, encoding="utf-8")
    (tmp_path / "tiny_mae.yaml").write_text(TINY_MAE, encoding="utf-8")
    with torch.device("meta"):
        params = sum(p.numel() for p in build(tmp_path / "wide.yaml").parameters())
    assert params > 40e6
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "fsdp_driver.py"), str(tmp_path / "mem.json"), str(tmp_path / "wide.yaml"),
               str(tmp_path / "run"), str(tmp_path / "tiny.yaml"), str(tmp_path / "tiny_mae.yaml"),
               str(ROOT / "examples" / "sft" / "digits.yaml")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint" / "dcp" / ".metadata").is_file()
    weights = 4 * params  # fp32
    for rank in range(2):
        mem = json.loads((tmp_path / f"mem.json.{rank}").read_text())
        print(f"rank {rank}: P={params}, baseline {mem['baseline'] / 2**20:.0f} MiB, after build +"
              f"{mem['after_build'] / 2**20:.0f} MiB (bound {weights / 2**20:.0f}), whole run +"
              f"{mem['after_train'] / 2**20:.0f} MiB (bound {3 * weights / 2**20:.0f})")
        assert mem["after_build"] < weights, mem
        assert mem["after_train"] < 3 * weights, mem
        assert mem["init_mismatches"] == [], mem["init_mismatches"][:10]
