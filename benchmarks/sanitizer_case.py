"""Tiny workload for compute-sanitizer (memcheck / racecheck): every CUDA backend that is
available runs a small shifted stripe case and a small shifted window case, forward and
backward, in float32 and bfloat16. Exits non-zero if a backend errors.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitizer_case.py
"""
import sys

import torch

import grl_kernels
from grl_kernels.backends import registry
from grl_kernels.bench.cases import call_backend, make_inputs, parse_case

CASES = [
    parse_case("stripe:32x32,size=8xNone,groups=Nonex4,shift=1,f=4,heads=3,dim=30"),
    parse_case("stripe:32x48,size=8xNone,groups=Nonex4,shift=1,f=4,heads=2,dim=16,vertical=1"),
    parse_case("window:24x24,ws=8,shift=1,heads=3,dim=30"),
]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    names = [n for n in grl_kernels.available_backends() if n != "reference"
             and registry._REGISTRY[n].supports(torch.device("cuda"), torch.float32)]
    if not names:
        print("no CUDA backend available:", grl_kernels.backend_info())
        return 1
    for name in names:
        b = registry._REGISTRY[name]
        for dtype in (torch.float32, torch.bfloat16):
            if dtype not in b.dtypes:
                continue
            for case in CASES:
                inp = make_inputs(case, dtype, "cuda", requires_grad=True)
                out = call_backend(b, case, inp)
                out.float().square().sum().backward()
                torch.cuda.synchronize()
                print(f"ok {name} {dtype} {case.describe()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
