#!/usr/bin/env python3
"""Seconds per 96^3 window of the same UNETR that `cargo bench -p glmae-infer --bench forward`
times, in PyTorch (eager, CPU), onnxruntime (f32, and int8 by onnxruntime's own quantizer) and
OpenVINO (its default precision, and f32 forced), at 1 and 2 threads. Compare with
docs/performance.md, glmae-infer section.

    pip install torch monai einops onnx onnxruntime openvino
    python3 scripts/bench_infer_reference.py [--reps 5] [--threads 1,2] [--out /tmp/unetr-onnx]

Model: MONAI's UNETR with a ViT-T encoder (hidden 192, 12 blocks, 3 heads, MLP 768, patch 16,
qkv bias), feature size 16, 14 classes, "conv" patch embedding, instance norm, residual blocks,
random weights. MONAI 1.6's UNETR constructor has no position-embedding option (it uses a
learned table); glmae's models use a fixed sin-cos table: either way it is one add of
216 x 192 values, nothing that changes the timing.

Timing: one warm-up run, then the median (and min) of --reps runs, batch 1, torch.inference_mode
for PyTorch; onnxruntime sessions keep their default graph optimisations (ORT_ENABLE_ALL) with
intra_op_num_threads set and inter_op_num_threads 1. cpu_s is the process's CPU time per window
(all threads), which stays comparable when other jobs share the machine.

OpenVINO (`openvino` on PyPI) compiles the same ONNX file for "CPU" with INFERENCE_NUM_THREADS,
NUM_STREAMS 1 and PERFORMANCE_HINT LATENCY, twice: with its default INFERENCE_PRECISION_HINT
(bf16 on a CPU with AVX512_BF16 or AMX, f32 elsewhere; the line prints what it chose) and with
the hint forced to f32.

int8 for onnxruntime: `quantize_dynamic(per_channel=True, weight_type=QInt8)` (weights int8 per
output channel, activations quantised at run time; the form closest to glmae's int8 files) and
`quantize_static(QDQ, per_channel=True)` calibrated on 4 random inputs; both are reported.
"""

import argparse
import os
import statistics
import time

import numpy as np
import torch
from monai.networks.nets import UNETR

CONFIG = dict(in_channels=1, out_channels=14, img_size=(96, 96, 96), feature_size=16, hidden_size=192,
              mlp_dim=768, num_heads=3, proj_type="conv", norm_name="instance", res_block=True,
              qkv_bias=True)


def timed(fn, reps):
    """Median and min wall seconds, and mean process CPU seconds (all threads), per call."""
    fn()  # warm-up
    times = []
    c0 = time.process_time()
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), (time.process_time() - c0) / reps


def load_avg():
    try:
        return open("/proc/loadavg").read().split()[:3]
    except OSError:
        return ["?"]


def export(net, x, path):
    if os.path.exists(path):
        return
    # The TorchScript exporter: no onnxscript needed, and a plain opset-17 graph.
    torch.onnx.export(net, (x,), path, input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamo=False)


def ort_session(path, threads):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ov_model(path, threads, precision):
    """OpenVINO's compiled model for `path` on the CPU; `precision` None keeps its default."""
    import openvino as ov
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return ov.Core().compile_model(path, "CPU", config)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default="/tmp/unetr-onnx")
    ap.add_argument("--skip", default="", help="comma list of torch,ort,ort-dynamic,ort-static,ov,ov-f32")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    threads = [int(t) for t in args.threads.split(",")]
    os.makedirs(args.out, exist_ok=True)

    import onnxruntime as ort
    try:
        import openvino
        ov_version = openvino.__version__
    except ImportError:
        ov_version, skip = "not installed", skip | {"ov", "ov-f32"}
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, openvino {ov_version}, load average {' '.join(load_avg())}")
    torch.manual_seed(0)
    net = UNETR(**CONFIG).eval()
    x = torch.rand(1, 1, 96, 96, 96)
    xn = x.numpy()

    f32 = os.path.join(args.out, "unetr-vit-t.onnx")
    with torch.inference_mode():
        ref = net(x).numpy()
    export(net, x, f32)

    variants = [("onnxruntime f32", f32, "ort")]
    if "ort-dynamic" not in skip:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        dyn = os.path.join(args.out, "unetr-vit-t-int8-dynamic.onnx")
        if not os.path.exists(dyn):
            quantize_dynamic(f32, dyn, per_channel=True, weight_type=QuantType.QInt8)
        variants.append(("onnxruntime int8 dynamic per-channel", dyn, "ort-dynamic"))
    if "ort-static" not in skip:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                rng = np.random.default_rng(1)
                self.items = iter([{"input": rng.random((1, 1, 96, 96, 96), dtype=np.float32)} for _ in range(4)])

            def get_next(self):
                return next(self.items, None)

        st = os.path.join(args.out, "unetr-vit-t-int8-static.onnx")
        if not os.path.exists(st):
            quantize_static(f32, st, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        variants.append(("onnxruntime int8 static QDQ per-channel", st, "ort-static"))

    for n in threads:
        if "torch" not in skip:
            torch.set_num_threads(n)
            with torch.inference_mode():
                med, best, cpu = timed(lambda: net(x), args.reps)
            print(f"RESULT pytorch f32 threads={n} s_per_window={med:.3f} min={best:.3f} cpu_s={cpu:.3f}")
        for name, path, key in variants:
            if key in skip:
                continue
            sess = ort_session(path, n)
            out = sess.run(None, {"input": xn})[0]
            err = np.abs(out - ref).max() / (ref.max() - ref.min())
            med, best, cpu = timed(lambda: sess.run(None, {"input": xn}), args.reps)
            print(f"RESULT {name} threads={n} s_per_window={med:.3f} min={best:.3f} cpu_s={cpu:.3f} "
                  f"max_diff_vs_torch={err:.1e}_of_range")
        for key, precision in [("ov", None), ("ov-f32", "f32")]:
            if key in skip:
                continue
            compiled = ov_model(f32, n, precision)
            request = compiled.create_infer_request()
            chosen = compiled.get_property("INFERENCE_PRECISION_HINT")
            out = request.infer({0: xn})[0]
            err = np.abs(out - ref).max() / (ref.max() - ref.min())
            med, best, cpu = timed(lambda: request.infer({0: xn}), args.reps)
            label = "default" if precision is None else "forced"
            print(f"RESULT openvino {label} precision={chosen} threads={n} s_per_window={med:.3f} min={best:.3f} "
                  f"cpu_s={cpu:.3f} max_diff_vs_torch={err:.1e}_of_range")
    print(f"load average after: {' '.join(load_avg())}")


if __name__ == "__main__":
    main()
