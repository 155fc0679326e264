"""hfactory's ``auto`` attention backend against plain ``math`` in whole presets: CPU inference,
paired rounds in one process (``benchmarks/RESULTS.md``, "Presets vs timm", Interpretation).

Per preset: one model (random init), batch 8 at its resolution, ``eval()`` under
``torch.inference_mode()``; one warm-up call per backend, then ``--rounds`` rounds that time one
call under ``hfactory.attention_backend(name)`` for each, alternating which goes first. Prints
the auto / math time ratio of the medians and of the fastest calls (< 1: ``auto`` is faster).

Usage (from the repository root)::

    .venv/bin/python benchmarks/attention_backend_ab.py swinv2_tiny_window8_256 sam2_hiera_tiny --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import machine_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    import hfactory

    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    for name in args.presets:
        torch.manual_seed(0)
        model = hfactory.create_model(name).eval()
        size = hfactory.load_preset(name).img_hw[0]
        images = torch.randn(8, 3, size, size)

        def call(backend: str) -> float:
            with torch.inference_mode(), hfactory.attention_backend(backend):
                start = time.perf_counter()
                model(images)
                return time.perf_counter() - start

        times = {"auto": [], "math": []}
        for backend in times:
            call(backend)
        for r in range(args.rounds):
            for backend in (("auto", "math") if r % 2 == 0 else ("math", "auto")):
                times[backend].append(call(backend))
        median = statistics.median(times["auto"]) / statistics.median(times["math"])
        best = min(times["auto"]) / min(times["math"])
        print(f"{name}: auto/math median {median:.3f}, fastest {best:.3f} "
              f"(auto median {statistics.median(times['auto']) * 1e3:.0f} ms)", flush=True)


if __name__ == "__main__":
    main()
