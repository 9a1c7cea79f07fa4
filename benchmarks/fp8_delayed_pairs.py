"""fp8_delayed's pair quantizers at the 1b model's shapes, and what their delayed-scaling gates cost (GPU).

For every operand pair one 1b block quantizes under fp8_delayed (X of q/k/v and of w1/w3 and the
attention output, 16384 x 2048 bf16; the seven fp32 weights; dY of q, k, v, o and w2) this times,
in CUDA graphs:
  - "delayed": the traced op's CUDA body (pair_quantize_op.fp8_tensor_pair_delayed_direct: the
    gated amax kernel, the pair kernel, the history roll);
  - "pair": the pair kernel alone with the amax given (fp8_tensor_pair), so delayed - pair is what
    the two small kernels around it cost;
and reports each as a fraction of a bf16 device copy's bandwidth measured in the same run (bytes:
the input read once, both fp8 codes written once). Also times the same pair reading the fp32
residual gradient, for dY of o and w2, whose bf16 cast is otherwise a separate pass.

    python benchmarks/fp8_delayed_pairs.py --out $OUT/fp8_delayed_pairs.json
    python benchmarks/fp8_delayed_pairs.py --ab TRANSPOSED_DIV

`--ab KNOB` then times every case's delayed pair with a boolean knob of
lowbit.kernels._pair_quantize_triton off and on, alternating (3 rounds, medians), and checks
that both settings give the same codes, scales and histories.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantize_bw import _bench_graph  # noqa: E402

from lowbit.kernels import pair_quantize_op as po  # noqa: E402

TOKENS, DIM, KV, FFN = 16384, 2048, 512, 8192
# (name, shape, dtype, calls per block)
CASES = (
    ("X (qkv, w1/w3, o)", (TOKENS, DIM), torch.bfloat16, 3),
    ("W q, o", (DIM, DIM), torch.float32, 2),
    ("W k, v", (KV, DIM), torch.float32, 2),
    ("W w1, w3", (FFN, DIM), torch.float32, 2),
    ("W w2", (DIM, FFN), torch.float32, 1),
    ("dY q", (TOKENS, DIM), torch.bfloat16, 1),
    ("dY k, v", (TOKENS, KV), torch.bfloat16, 2),
    ("dY o, w2", (TOKENS, DIM), torch.bfloat16, 2),
    ("dY o, w2 read as fp32", (TOKENS, DIM), torch.float32, 0),
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--ab", default="", help="a boolean knob of _pair_quantize_triton, timed off and on")
    args = ap.parse_args()
    from lowbit.kernels import _pair_quantize_triton as kt

    if args.ab and not isinstance(getattr(kt, args.ab, None), bool):
        raise SystemExit(f"--ab: {args.ab!r} is not a boolean knob of lowbit.kernels._pair_quantize_triton")
    x0 = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(x0)
    copy_gbps = 2 * x0.numel() * 2 / _bench_graph(lambda: dst.copy_(x0)) / 1e6
    rows = []
    total_delayed = total_pair = 0.0
    for name, shape, dtype, calls in CASES:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        hist = torch.zeros(2, 16, device="cuda")
        po.fp8_tensor_pair_delayed_direct(x, "fp8_e4m3", hist[0], hist[1])  # history no longer empty
        amax = x.abs().amax().float()
        def delayed(x: torch.Tensor = x, hist: torch.Tensor = hist) -> None:
            po.fp8_tensor_pair_delayed_direct(x, "fp8_e4m3", hist[0], hist[1])

        t_d = _bench_graph(delayed)
        t_p = _bench_graph(lambda x=x, amax=amax: po.fp8_tensor_pair(x, amax, "fp8_e4m3"))
        nbytes = x.numel() * (x.element_size() + 2)
        row = dict(name=name, shape=list(shape), dtype=str(dtype), calls_per_block=calls,
                   delayed_us=t_d * 1e3, pair_us=t_p * 1e3, gates_us=(t_d - t_p) * 1e3,
                   delayed_of_copy=nbytes / t_d / 1e6 / copy_gbps,
                   pair_of_copy=nbytes / t_p / 1e6 / copy_gbps)
        rows.append(row)
        total_delayed += 16 * calls * t_d
        total_pair += 16 * calls * t_p
        print(f"{name:>24} {str(tuple(shape)):>14} {str(dtype)[6:]:>8}: delayed {t_d * 1e3:7.1f} us "
              f"({row['delayed_of_copy']:.2f} of copy), pair alone {t_p * 1e3:7.1f} us "
              f"({row['pair_of_copy']:.2f})",
              flush=True)
    print(f"copy {copy_gbps:.0f} GB/s; per 1b step (16 blocks): delayed {total_delayed:.2f} ms, "
          f"pairs alone {total_pair:.2f} ms")
    ab_rows = _ab(args.ab, kt, copy_gbps) if args.ab else []
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(copy_gbps=copy_gbps, rows=rows, step_delayed_ms=total_delayed,
                           step_pair_ms=total_pair, ab=ab_rows, device=torch.cuda.get_device_name(),
                           torch=torch.__version__), f, indent=1)


def _ab(knob: str, kt: object, copy_gbps: float) -> list[dict]:
    """Each case's delayed pair with `knob` off and on: times (3 alternating rounds, medians), the
    1b step's total for each, and whether both give the same bits."""
    before = getattr(kt, knob)
    rows, step = [], {False: 0.0, True: 0.0}
    try:
        for name, shape, dtype, calls in CASES:
            x = torch.randn(shape, device="cuda", dtype=dtype)
            times, bits = {False: [], True: []}, {}
            for _ in range(3):
                for on in (False, True):
                    setattr(kt, knob, on)
                    hist = torch.full((2, 16), 3.0, device="cuda")

                    def call(x: torch.Tensor = x, hist: torch.Tensor = hist) -> tuple[torch.Tensor, ...]:
                        return po.fp8_tensor_pair_delayed_direct(x, "fp8_e4m3", hist[0], hist[1])

                    out = call()
                    # Copies: the timed replays below roll this history again.
                    bits[on] = [t.clone().view(torch.uint8 if t.element_size() == 1 else torch.int32)
                                for t in (*out, hist)]
                    times[on].append(_bench_graph(call))
            same = all(torch.equal(a, b) for a, b in zip(bits[False], bits[True]))
            nbytes = x.numel() * (x.element_size() + 2)
            row = dict(case=name, knob=knob, bitexact=same)
            for on in (False, True):
                t = sorted(times[on])[1]
                row[f"{on}_us"], row[f"{on}_of_copy"] = t * 1e3, nbytes / t / 1e6 / copy_gbps
                step[on] += 16 * calls * t
            rows.append(row)
            print(f"{name:>24} {knob} off {row['False_us']:7.1f} us ({row['False_of_copy']:.2f}), on "
                  f"{row['True_us']:7.1f} us ({row['True_of_copy']:.2f}), same bits: {same}", flush=True)
    finally:
        setattr(kt, knob, before)
    print(f"per 1b step (16 blocks): {knob} off {step[False]:.2f} ms, on {step[True]:.2f} ms")
    return rows


if __name__ == "__main__":
    main()
