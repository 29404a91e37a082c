//! Seconds for one training convolution (forward, input gradient, weight gradient) on the CPU:
//! burn 0.22 flex's `conv3d` against `glmae_train::nets::conv::conv3d`, in interleaved rounds, on the
//! fine-tuning step's shapes (3x3x3, batch 2, 32^3 and 16^3). `cargo bench -p glmae-train --bench
//! train_conv -- [rounds]`; docs/performance.md has the results.

use std::time::Instant;

use burn::tensor::module::conv3d as burn_conv3d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor};

/// Forward and backward through `sum(conv(x, w) * r)`, gradients of x and w; seconds.
fn round(ours: bool, x: &Tensor<5>, w: &Tensor<5>, r: &Tensor<5>) -> f64 {
    let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
    let t = Instant::now();
    let y = if ours {
        glmae_train::nets::conv::conv3d(x.clone(), w.clone(), None)
    } else {
        burn_conv3d(x.clone(), w.clone(), None, ConvOptions::new([1; 3], [1; 3], [1; 3], 1))
    };
    let grads = (y * r.clone()).sum().backward();
    let (gx, gw) = (x.grad(&grads).expect("x grad"), w.grad(&grads).expect("w grad"));
    // Reading the values waits for every kernel.
    let _ = (gx.into_data(), gw.into_data());
    t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let rounds: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads = rayon::current_num_threads();
    let device = Device::flex().autodiff();
    println!(
        "| shape (b, ci -> co, edge) | threads | burn flex conv3d (s) | glmae-train conv (s) | speed-up |"
    );
    println!("|---|---|---|---|---|");
    for (b, ci, co, n) in [(2, 16, 16, 32), (2, 8, 8, 32), (2, 16, 8, 32), (2, 1, 8, 32), (2, 32, 16, 16)] {
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<5>::random([b, ci, n, n, n], normal, &device);
        let w = Tensor::<5>::random([co, ci, 3, 3, 3], normal, &device);
        let r = Tensor::<5>::random([b, co, n, n, n], normal, &device);
        let (mut theirs, mut ours) = (Vec::new(), Vec::new());
        round(false, &x, &w, &r); // warm-up
        round(true, &x, &w, &r);
        for _ in 0..rounds {
            theirs.push(round(false, &x, &w, &r));
            ours.push(round(true, &x, &w, &r));
        }
        let (t, o) = (median(theirs), median(ours));
        println!("| ({b}, {ci} -> {co}, {n}^3) | {threads} | {t:.4} | {o:.4} | {:.1}x |", t / o);
    }
}
