"""TokenLinear's two routes per projection shape, threads and dtype (issue 15).

For each Swin-T / Hiera-T projection shape (batch 8 at 224 px: tokens x in -> out), each thread
count and dtype, times ``F.linear`` (hfactory's default) and the opt-in oneDNN route
(``TokenLinear.onednn = True``, :func:`hfactory.optimize`) in one process, interleaved, forward
+ backward, and prints the ratio ``linear time / oneDNN time`` (> 1: oneDNN faster). A route the
layer refuses (bf16 without AVX-512) is timed anyway by forcing the conv, to show why it is
refused.

    .venv/bin/python benchmarks/tokenlinear.py [--rounds 5] [--threads 1 2] [--append]

``--append`` adds the table to benchmarks/RESULTS.md. Run it on a quiet machine: other
processes on the cores change the figures several-fold.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import append_results, load_average, machine_line

#: (name, tokens, in, out): Swin-T stage 1 and 4 qkv / fc1 / fc2 at batch 8, Hiera-T stage 1 fc1.
SHAPES = [("swin s1 qkv", 25088, 96, 288), ("swin s1 fc1", 25088, 96, 384), ("swin s1 fc2", 25088, 384, 96),
          ("swin s3 fc1", 1568, 384, 1536), ("swin s4 fc1", 392, 768, 3072), ("swin s4 fc2", 392, 3072, 768),
          ("hiera s1 fc1", 25088, 96, 384)]


def conv_route(x, w, b):
    n, c = x.shape
    y = F.conv2d(x.reshape(1, 1, n, c).permute(0, 3, 1, 2), w[:, :, None, None], b, dilation=2)
    return y.permute(0, 2, 3, 1).reshape(n, w.shape[0])


def time_call(fn, x, w, b) -> float:
    x.grad = w.grad = b.grad = None
    start = time.perf_counter()
    fn(x, w, b).sum().backward()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    load_before = load_average()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for name, n, cin, cout in SHAPES:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(n, cin, generator=g).to(dtype).requires_grad_()
                w = (torch.randn(cout, cin, generator=g) / cin ** 0.5).to(dtype).requires_grad_()
                b = torch.zeros(cout, dtype=dtype, requires_grad=True)
                times = {"linear": [], "onednn": []}
                routes = {"linear": F.linear, "onednn": conv_route}
                for fn in routes.values():  # warm-up
                    time_call(fn, x, w, b)
                for r in range(args.rounds):
                    order = list(routes) if r % 2 == 0 else list(routes)[::-1]
                    for key in order:
                        times[key].append(time_call(routes[key], x, w, b))
                lin, dnn = statistics.median(times["linear"]), statistics.median(times["onednn"])
                rows.append((threads, dtype_name, name, n, cin, cout, lin * 1e3, dnn * 1e3, lin / dnn))
                print(f"{threads}t {dtype_name:8s} {name:13s} linear {lin * 1e3:8.2f} ms  oneDNN {dnn * 1e3:8.2f} ms"
                      f"  ratio {lin / dnn:5.2f}", flush=True)
    head = (f"## TokenLinear: F.linear vs the oneDNN 1x1 conv, per projection (forward + backward)\n\n"
            f"Measured on {machine_line(max(args.threads))} (threads per row below); load average "
            f"{load_before} before, {load_average()} after. Median of {args.rounds} interleaved rounds after a "
            f"warm-up. Ratio = F.linear time / oneDNN time (> 1: oneDNN faster). Command: "
            f"`.venv/bin/python benchmarks/tokenlinear.py --rounds {args.rounds} --threads "
            f"{' '.join(map(str, args.threads))}`.\n\n"
            "| threads | dtype | projection | tokens | in -> out | F.linear ms | oneDNN ms | ratio |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {t} | {d} | {nm} | {n} | {ci} -> {co} | {a:.2f} | {c:.2f} | {r:.2f} |\n"
                   for t, d, nm, n, ci, co, a, c, r in rows)
    print("\n" + head + body)
    if args.append:
        append_results(head + body)


if __name__ == "__main__":
    main()
