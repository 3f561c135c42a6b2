"""How accurate is each way of computing the DoRA row norm on a GPU? Max relative error against fp64.

    python benchmarks/diagnose_norm.py

Rows: weight/adapter dtypes, layer and rank. Columns: the op (``factored_row_norm``
on CUDA), the plain-torch factored path, and PEFT's dense math (``W.to(A.dtype) +
s·B·A`` then the norm, in the adapter dtype), each against the fp64 dense norm.
"""

from __future__ import annotations

import torch

from dora_fused.kernels import dense_row_norm_reference, factored_row_norm, factored_row_norm_torch


def dense_peft(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return torch.linalg.vector_norm(w.to(a.dtype) + s * (b @ a), dim=1).float()


def max_rel(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).abs() / exact).max().item()


def main() -> None:
    cases = {"op": factored_row_norm, "torch factored": factored_row_norm_torch, "PEFT dense": dense_peft}
    print("dtypes        layer        r    " + "  ".join(f"{c:>14s}" for c in cases))
    for wdt, adt in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        for d_in, d_out in ((4096, 4096), (14336, 4096)):
            for r in (16, 384):
                gen = torch.Generator(device="cuda").manual_seed(r)
                w = (torch.randn(d_out, d_in, device="cuda", generator=gen) / d_in**0.5).to(wdt)
                a = (torch.randn(r, d_in, device="cuda", generator=gen) / d_in**0.5).to(adt)
                b = (torch.randn(d_out, r, device="cuda", generator=gen) / r**0.5).to(adt)
                exact = dense_row_norm_reference(w.double(), a.double(), b.double(), 2.0)
                errors = [max_rel(fn(w, a, b, 2.0), exact) for fn in cases.values()]
                dtypes = f"{str(wdt)[6:]}/{str(adt)[6:]}"
                print(f"{dtypes:13s} {d_in}->{d_out:<6d} {r:4d}  " + "  ".join(f"{e:14.2e}" for e in errors))


if __name__ == "__main__":
    main()
