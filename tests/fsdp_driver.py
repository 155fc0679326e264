"""Run under ``torchrun --nproc_per_node=2`` by tests/test_fsdp.py (not a test module itself).

``python fsdp_driver.py OUT_JSON SPEC RUN_DIR``: in each process, after the imports and the
process group, note the peak RSS (the baseline); train SPEC for 2 steps with ``--fsdp`` (sharded
build, one sharded DCP checkpoint), noting the peak right after the sharded build and at the
end; then check that the sharded initialisation of small specs of every model kind equals the
unsharded one. Rank r writes ``OUT_JSON.r``.
"""

import json
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401  (imported before the baseline)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import hfactory.train.fsdp as D
from hfactory.models import build
from hfactory.spec.io import load_any_spec
from hfactory.train.classify import train
from hfactory.train.config import TrainConfig
from hfactory.train.data import load_data


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(out_json: str, spec_path: str, run_dir: str, *small: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    spec = load_any_spec(Path(spec_path))
    config = TrainConfig(fsdp=True, epochs=1, batch_size=2, stop_at_step=2, progress=False, threads=1,
                         shift=0.0, device="cpu")
    load_data(config.data, spec.img_hw, spec.in_chans)  # the data and its libraries (sklearn) before the baseline
    baseline = peak_bytes()
    result = {"baseline": baseline}
    build_sharded = D.build_sharded

    def measured(*args, **kwargs):  # instrumentation: the peak right after the sharded build
        model = build_sharded(*args, **kwargs)
        result["after_build"] = peak_bytes() - baseline
        return model

    D.build_sharded = measured
    train(spec, run_dir, config)
    result["after_train"] = peak_bytes() - baseline
    D.build_sharded = build_sharded

    # sharded initialisation == unsharded, bit for bit, for every model kind
    mismatches = []
    for path in small:
        kind = "mae" if "mae" in Path(path).name else None
        torch.manual_seed(3)
        model = D.build_sharded(lambda: build(path, kind=kind), torch.device("cpu"))
        end = torch.get_rng_state()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.manual_seed(3)
            ref = build(path, kind=kind)
            if not torch.equal(end, torch.get_rng_state()):
                mismatches.append(f"{path}: RNG state after the build")
            want = ref.state_dict()
            if full.keys() != want.keys():
                mismatches.append(f"{path}: keys {sorted(full.keys() ^ want.keys())[:5]}")
            mismatches += [f"{path}: {k}" for k in want if k in full and not torch.equal(full[k], want[k])]
    result["init_mismatches"] = mismatches
    Path(f"{out_json}.{rank}").write_text(json.dumps(result), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
