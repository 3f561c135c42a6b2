"""Which part of the CUDA factored norm loses accuracy? U, G and the assembly kernel against fp64, by rank and tile."""

from __future__ import annotations

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled

from dora_fused.kernels import factored_norm as fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def main() -> None:
    d = 4096
    for wdt, adt in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)):
        for r in (16, 128, 384):
            gen = torch.Generator(device="cuda").manual_seed(0)
            w = (torch.randn(d, d, device="cuda", generator=gen) / d**0.5).to(wdt)
            a = (torch.randn(r, d, device="cuda", generator=gen) / d**0.5).to(adt)
            b = (torch.randn(d, r, device="cuda", generator=gen) / r**0.5).to(adt)
            w64, a64, b64 = w.double(), a.double(), b.double()
            terms, scale = fn.adapter_terms(a, wdt)
            u = fn._mm_fp32(w, terms.T)
            t = terms.shape[0] // r
            u_sum = sum(u[:, i * r : (i + 1) * r].double() for i in range(t)) / scale.double()
            g = fn.gram_fp32(a)
            g_tc = fn.gram_triton(a)
            exact_n = fn.dense_row_norm_reference(w64, a64, b64, 1.0)
            # the assembly in fp64 from the same U and G
            g64 = g.double()
            asm64 = ((w64 * w64).sum(1) + 2 * (b64 * u_sum).sum(1) + ((b64 @ g64) * b64).sum(1)).sqrt()
            line = [
                f"{str(wdt)[6:]}/{str(adt)[6:]} r={r:3d} U {rel(u_sum, w64 @ a64.T):.1e} G {rel(g, a64 @ a64.T):.1e} "
                f"G split-K TC {rel(g_tc, a64 @ a64.T):.1e}"
            ]
            line.append(f"asm64 {((asm64 - exact_n).abs() / exact_n).max():.1e}")
            for bn in (16, 128):
                for br in (16, 32):
                    cfg = dict(
                        BLOCK_M=32, BLOCK_K=128, BLOCK_R=br, BLOCK_N=min(bn, triton.next_power_of_2(r)), num_warps=4
                    )
                    with set_wrap_triton_enabled(False):
                        n = fn.factored_row_norm_triton(w, a, b, 1.0, config=cfg)
                    err = (n.double() - exact_n).abs() / exact_n
                    line.append(f"N{bn}R{br}:{err.max():.1e}/{(err > 2e-6).sum().item()}")
            print(" ".join(line), flush=True)


if __name__ == "__main__":
    main()
