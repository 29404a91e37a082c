//! Integer kernels for the int8 forward pass: int8 activations times int8 weights, summed in
//! int32, then requantised to int8 or dequantised to f32.
//!
//! Integer sums do not depend on their order, so every target computes the same accumulators;
//! the f32 steps around them (scales, norms) are single operations in a fixed order, like the
//! f32 path. Host and firmware labels are therefore bit-identical.
//!
//! The one hot loop is [`dot`] (and [`dot2`]), a dot product of int8 weights with an int8 column:
//! - Cortex-M4F / M33 (the DSP extension, no Helium): four products per `SXTB16` pair and two
//!   `SMLAD`s, in a module compiled for such targets only, as CMSIS-NN's `arm_nn_mat_mult` does.
//!   rustc has no `mve` feature name and reports Helium as `neon` on M-profile (for
//!   `-C target-cpu=cortex-m55`), so "DSP and not NEON" is the test;
//! - Cortex-M55 (Helium): the portable loop, which LLVM turns into `VMLAVA.S8` over 16 lanes with
//!   tail predication (`llvm-objdump -d --mcpu=cortex-m55` of the firmware shows it);
//! - elsewhere the portable loop, vectorised by the compiler where it can. On armv7 Linux (DSP,
//!   no NEON by default) the DSP module runs, so CI's qemu-arm tests check it against the
//!   definition.
//!
//! Weights stay the bytes of the weight file (`&[u8]` read as `i8`): the model is used in place,
//! from flash on a microcontroller.

use super::{Dims3, voxels};

/// Largest magnitude of a stored int8 value: symmetric quantisation, -128 unused (as the
/// weights, so that the product of two values fits 14 bits and -(-128) needs no care).
pub const QMAX: i32 = 127;

/// `v / scale` rounded half away from zero and clamped to `[-127, 127]`, given `inv = 1 / scale`.
/// NaN maps to 0.
#[inline]
pub fn quantize(v: f32, inv: f32) -> i8 {
    let t = v * inv;
    let r = if t >= 0.0 { t + 0.5 } else { t - 0.5 };
    // `as` saturates (and maps NaN to 0) before the clamp.
    (r as i32).clamp(-QMAX, QMAX) as i8
}

/// Quantises `x` into `out` with scale `1 / inv`.
pub fn quantize_slice(x: &[f32], inv: f32, out: &mut [i8]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = quantize(v, inv);
    }
}

/// An int32 accumulator to int8 by a fixed-point multiplier, the requantisation of CMSIS-NN and
/// TFLite: `q = round(acc * ratio)` computed as `(acc * mult) >> shift` with `mult` a Q31 number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requant {
    mult: i32,
    /// Right shift applied after the 64-bit product, in `1..=62`.
    shift: u32,
}

impl Requant {
    /// The multiplier for `ratio` (output value per accumulator unit: input scale times weight
    /// scale over output scale). Ratios below 2^-32 give 0, above 2^30 are clamped to 2^30.
    pub fn new(ratio: f32) -> Self {
        if !(ratio > 0.0 && ratio.is_finite()) {
            return Self { mult: 0, shift: 31 };
        }
        // ratio = m * 2^e with m in [0.5, 1): mult = round(m * 2^31), shift = 31 - e in 1..=62.
        let (mut m, mut e) = (ratio, 0i32);
        while m >= 1.0 {
            m *= 0.5;
            e += 1;
        }
        while m < 0.5 {
            m *= 2.0;
            e -= 1;
        }
        let mut mult = (f64::from(m) * 2_147_483_648.0 + 0.5) as i64;
        if mult == 1 << 31 {
            mult /= 2;
            e += 1;
        }
        if e > 30 {
            return Self { mult: i32::MAX, shift: 1 };
        }
        if e < -31 {
            return Self { mult: 0, shift: 31 };
        }
        Self { mult: mult as i32, shift: (31 - e) as u32 }
    }

    /// `acc * ratio`, rounded half up, clamped to int8's symmetric range.
    #[inline]
    pub fn apply(self, acc: i32) -> i8 {
        let p = i64::from(acc) * i64::from(self.mult);
        let r = (p + (1i64 << (self.shift - 1))) >> self.shift;
        r.clamp(-i64::from(QMAX), i64::from(QMAX)) as i8
    }
}

/// `sum_i (w[i] as i8) * x[i]` over the shorter of the two.
#[inline]
pub fn dot(w: &[u8], x: &[i8]) -> i32 {
    #[cfg(all(target_arch = "arm", target_feature = "dsp", not(target_feature = "neon")))]
    {
        dsp::dot(w, x)
    }
    #[cfg(not(all(target_arch = "arm", target_feature = "dsp", not(target_feature = "neon"))))]
    {
        dot_portable(w, x)
    }
}

/// [`dot`] of two weight rows with one column: each column word is loaded and unpacked once
/// for both rows (CMSIS-NN's two-output-channel inner loop).
#[inline]
pub fn dot2(w0: &[u8], w1: &[u8], x: &[i8]) -> (i32, i32) {
    #[cfg(all(target_arch = "arm", target_feature = "dsp", not(target_feature = "neon")))]
    {
        dsp::dot2(w0, w1, x)
    }
    #[cfg(not(all(target_arch = "arm", target_feature = "dsp", not(target_feature = "neon"))))]
    {
        (dot_portable(w0, x), dot_portable(w1, x))
    }
}

/// [`dot`] as plain Rust: the definition, and the Helium and host code.
#[inline]
pub fn dot_portable(w: &[u8], x: &[i8]) -> i32 {
    w.iter().zip(x).map(|(&a, &b)| i32::from(a as i8) * i32::from(b)).sum()
}

/// The Armv7E-M / Armv8-M DSP extension: `SXTB16` splits a word of four int8 into two pairs of
/// int16 (bytes 0, 2 and, rotated, 1, 3), `SMLAD` adds both products of a pair to the sum.
#[cfg(all(target_arch = "arm", target_feature = "dsp", not(target_feature = "neon")))]
#[allow(unsafe_code)]
mod dsp {
    use core::arch::asm;

    #[inline(always)]
    fn sxtb16(x: u32) -> u32 {
        let r;
        // SAFETY: a register-only instruction of the DSP extension, which this cfg requires.
        unsafe { asm!("sxtb16 {0}, {1}", out(reg) r, in(reg) x, options(pure, nomem, nostack)) };
        r
    }

    #[inline(always)]
    fn sxtb16_ror8(x: u32) -> u32 {
        let r;
        // SAFETY: as `sxtb16`.
        unsafe { asm!("sxtb16 {0}, {1}, ror #8", out(reg) r, in(reg) x, options(pure, nomem, nostack)) };
        r
    }

    #[inline(always)]
    fn smlad(a: u32, b: u32, acc: i32) -> i32 {
        let r;
        // SAFETY: as `sxtb16`; SMLAD only sets the Q flag on overflow, which nothing reads.
        unsafe {
            asm!("smlad {0}, {1}, {2}, {3}", out(reg) r, in(reg) a, in(reg) b, in(reg) acc,
                options(pure, nomem, nostack));
        }
        r
    }

    pub(super) fn dot(w: &[u8], x: &[i8]) -> i32 {
        let n = w.len().min(x.len());
        let (w, x) = (&w[..n], &x[..n]);
        let mut acc = 0i32;
        let (wq, xq) = (w.chunks_exact(4), x.chunks_exact(4));
        let (wr, xr) = (wq.remainder(), xq.remainder());
        for (a, b) in wq.zip(xq) {
            let a = u32::from_le_bytes([a[0], a[1], a[2], a[3]]);
            let b = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
            acc = smlad(sxtb16(a), sxtb16(b), acc);
            acc = smlad(sxtb16_ror8(a), sxtb16_ror8(b), acc);
        }
        acc + super::dot_portable(wr, xr)
    }

    pub(super) fn dot2(w0: &[u8], w1: &[u8], x: &[i8]) -> (i32, i32) {
        let n = w0.len().min(w1.len()).min(x.len());
        let (w0, w1, x) = (&w0[..n], &w1[..n], &x[..n]);
        let (mut a0, mut a1) = (0i32, 0i32);
        let (p4, q4, x4) = (w0.chunks_exact(4), w1.chunks_exact(4), x.chunks_exact(4));
        let (pr, qr, xr) = (p4.remainder(), q4.remainder(), x4.remainder());
        for ((p, q), b) in p4.zip(q4).zip(x4) {
            let b = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
            let (b02, b13) = (sxtb16(b), sxtb16_ror8(b));
            let (p, q) =
                (u32::from_le_bytes([p[0], p[1], p[2], p[3]]), u32::from_le_bytes([q[0], q[1], q[2], q[3]]));
            a0 = smlad(sxtb16(p), b02, a0);
            a0 = smlad(sxtb16_ror8(p), b13, a0);
            a1 = smlad(sxtb16(q), b02, a1);
            a1 = smlad(sxtb16_ror8(q), b13, a1);
        }
        (a0 + super::dot_portable(pr, xr), a1 + super::dot_portable(qr, xr))
    }
}

/// Copies the input planes `z - 1`, `z`, `z + 1` of `input` (`(in_ch, dims)`) into `slab`
/// (`(in_ch, 3, dims[1] + 2, dims[2] + 2)`) with a border of zeros one voxel wide, and planes
/// outside the volume all zero: a 3x3x3 convolution's output plane `z` then reads every tap
/// without bounds logic, from scratch three planes deep rather than a padded copy of the volume.
fn pad_slab(input: &[i8], dims: Dims3, in_ch: usize, z: usize, slab: &mut [i8]) {
    let (p1, p2) = (dims[1] + 2, dims[2] + 2);
    let plane = dims[1] * dims[2];
    slab[..in_ch * 3 * p1 * p2].fill(0);
    for (c, src) in input.chunks_exact(voxels(dims)).take(in_ch).enumerate() {
        for dz in 0..3 {
            let Some(iz) = (z + dz).checked_sub(1).filter(|&iz| iz < dims[0]) else { continue };
            let src = &src[iz * plane..(iz + 1) * plane];
            for (y, row) in src.chunks_exact(dims[2]).enumerate() {
                let start = ((c * 3 + dz) * p1 + y + 1) * p2 + 1;
                slab[start..start + dims[2]].copy_from_slice(row);
            }
        }
    }
}

/// Copies the `in_ch * 27` inputs of the output voxel whose offset in the padded slab is `at` into
/// `col`, in the weight's `(in, dz, dy, dx)` order: three values per `(in, dz, dy)` row at
/// `at + c * pv + rows[dz * 3 + dy]`, each copied as one 4-byte word (an unaligned load and
/// store on Cortex-M4/M33/M55) whose fourth byte the next row's copy overwrites, the last as
/// three bytes.
fn gather3(padded: &[i8], pv: usize, rows: &[usize; 9], in_ch: usize, at: usize, col: &mut [i8]) {
    let last = (in_ch * 9).saturating_sub(1);
    for c in 0..in_ch {
        let base = at + c * pv;
        for (r, &row) in rows.iter().enumerate() {
            let (t, s) = (c * 9 + r, base + row);
            if t < last {
                copy_n::<4>(&mut col[3 * t..], &padded[s..]);
            } else {
                copy_n::<3>(&mut col[3 * t..], &padded[s..]);
            }
        }
    }
}

/// Copies the first `N` values of `src` to `dst` as one fixed-size value: a slice copy of a
/// length the compiler cannot prove is `N` becomes a `memcpy` call, tens of instructions for
/// four bytes on a Cortex-M.
#[inline(always)]
fn copy_n<const N: usize>(dst: &mut [i8], src: &[i8]) {
    if let (Some(d), Some(s)) = (dst.first_chunk_mut::<N>(), src.first_chunk::<N>()) {
        *d = *s;
    }
}

/// Scratch bytes of [`qconv3d`] for `in_ch` input channels, `k` taps and input `dims`.
pub fn qconv3d_scratch(in_ch: usize, k: usize, dims: Dims3) -> usize {
    // Saturating: a hostile window must give a huge length (and a scratch error), not overflow.
    let col = in_ch.saturating_mul(k * k * k);
    let padded =
        dims[1..].iter().fold(in_ch.saturating_mul(3), |n, &d| n.saturating_mul(d.saturating_add(2)));
    if k == 3 { col.saturating_add(padded) } else { col }
}

/// Stride-1, same-padding Conv3d with `k` taps (3 or 1; others are not supported) and no bias, in integers: `input` is
/// `(in_ch, dims)` int8; output channel `co`'s weights are the `in_ch * k^3` int8 values (bytes)
/// at `weight[co * row_stride + row_offset..]` (the whole `(out_ch, in_ch, k, k, k)` tensor with
/// `row_stride = in_ch * k^3` and offset 0, or the part of a wider one that reads these input
/// channels); `acc` receives `(out_ch, dims)` int32 sums. `col` holds [`qconv3d_scratch`]
/// values: the column of one output voxel, then (3x3x3) three zero-padded input planes.
#[allow(clippy::too_many_arguments)] // a convolution's geometry, weights and buffers
pub fn qconv3d(
    input: &[i8],
    dims: Dims3,
    in_ch: usize,
    (weight, row_stride, row_offset): (&[u8], usize, usize),
    out_ch: usize,
    k: usize,
    acc: &mut [i32],
    col: &mut [i8],
) {
    let v = voxels(dims);
    let row = in_ch * k * k * k;
    let (col, padded) = col.split_at_mut(row);
    let w = |co: usize| &weight[co * row_stride + row_offset..][..row];
    let (p1, p2) = (dims[1] + 2, dims[2] + 2);
    let pv = 3 * p1 * p2;
    let rows: [usize; 9] = core::array::from_fn(|r| ((r / 3) * p1 + r % 3) * p2);
    let mut voxel = 0;
    for z in 0..dims[0] {
        if k == 3 {
            pad_slab(input, dims, in_ch, z, padded);
        }
        for y in 0..dims[1] {
            for x in 0..dims[2] {
                if k == 3 {
                    gather3(padded, pv, &rows, in_ch, y * p2 + x, col);
                } else {
                    for (c, value) in col.iter_mut().enumerate() {
                        *value = input[c * v + voxel];
                    }
                }
                for co in (0..out_ch - out_ch % 2).step_by(2) {
                    let (a0, a1) = dot2(w(co), w(co + 1), col);
                    acc[co * v + voxel] = a0;
                    acc[(co + 1) * v + voxel] = a1;
                }
                if out_ch % 2 == 1 {
                    acc[(out_ch - 1) * v + voxel] = dot(w(out_ch - 1), col);
                }
                voxel += 1;
            }
        }
    }
}

/// ConvTranspose3d with kernel = stride = 2 and no bias, requantised: `input` is `(in_ch, dims)`
/// int8, `weight` the `(in_ch, out_ch, 2, 2, 2)` int8 values (bytes), `out` receives
/// `(out_ch, 2 dims)` int8 with `requant[co]` per output channel. `acc` holds `out_ch * 8` int32
/// of scratch.
pub fn qconv_transpose_up2(
    input: &[i8],
    dims: Dims3,
    in_ch: usize,
    weight: &[u8],
    requant: impl Fn(usize) -> Requant,
    out: &mut [i8],
    acc: &mut [i32],
) {
    let (v, od) = (voxels(dims), dims.map(|d| 2 * d));
    let per_in = weight.len() / in_ch; // out_ch * 8
    let out_ch = per_in / 8;
    let acc = &mut acc[..per_in];
    let mut voxel = 0;
    for z in 0..dims[0] {
        for y in 0..dims[1] {
            for x in 0..dims[2] {
                acc.fill(0);
                for (c, w) in weight.chunks_exact(per_in).enumerate().take(in_ch) {
                    let xv = i32::from(input[c * v + voxel]);
                    for (a, &wv) in acc.iter_mut().zip(w) {
                        *a += i32::from(wv as i8) * xv;
                    }
                }
                for co in 0..out_ch {
                    let r = requant(co);
                    for t in 0..8 {
                        let (a, b, e) = (t >> 2, (t >> 1) & 1, t & 1);
                        let o = ((co * od[0] + 2 * z + a) * od[1] + 2 * y + b) * od[2] + 2 * x + e;
                        out[o] = r.apply(acc[co * 8 + t]);
                    }
                }
                voxel += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg_i8(n: usize, seed: u64) -> Vec<i8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (((s >> 33) % 255) as i32 - 127) as i8
            })
            .collect()
    }

    #[test]
    fn dot_is_the_integer_dot_product_at_every_length_and_extreme() {
        for n in [0, 1, 3, 4, 5, 27, 216, 1000] {
            let w: Vec<u8> = lcg_i8(n, 1).iter().map(|&v| v as u8).collect();
            let x = lcg_i8(n, 2);
            let want: i64 = w.iter().zip(&x).map(|(&a, &b)| i64::from(a as i8) * i64::from(b)).sum();
            assert_eq!(i64::from(dot(&w, &x)), want, "n = {n}");
            let w1: Vec<u8> = lcg_i8(n, 3).iter().map(|&v| v as u8).collect();
            assert_eq!(dot2(&w, &w1, &x), (dot_portable(&w, &x), dot_portable(&w1, &x)), "dot2, n = {n}");
        }
        let (w, x) = (vec![0x81u8; 4096], vec![-127i8; 4096]); // -127 * -127 * 4096
        assert_eq!(dot(&w, &x), 127 * 127 * 4096);
    }

    #[test]
    fn quantize_rounds_half_away_and_saturates() {
        assert_eq!(quantize(0.5, 1.0), 1);
        assert_eq!(quantize(-0.5, 1.0), -1);
        assert_eq!(quantize(0.49, 1.0), 0);
        assert_eq!(quantize(1e9, 1.0), 127);
        assert_eq!(quantize(-1e9, 1.0), -127);
        assert_eq!(quantize(f32::NAN, 1.0), 0);
        assert_eq!(quantize(2.6, 10.0), 26);
    }

    #[test]
    fn requant_matches_rounded_real_product() {
        for ratio in [1e-6f32, 3.7e-4, 0.0123, 0.25, 0.5, 0.999, 1.0, 3.0] {
            let r = Requant::new(ratio);
            for acc in [-1_000_000, -12_345, -255, -1, 0, 1, 7, 300, 99_999, 2_000_000_000] {
                let want = (f64::from(acc) * f64::from(ratio)).round().clamp(-127.0, 127.0);
                let got = f64::from(r.apply(acc));
                // Half-way cases round up here, away from zero in `round`: allow one level there.
                assert!((got - want).abs() <= 1.0, "ratio {ratio} acc {acc}: {got} vs {want}");
                if (f64::from(acc) * f64::from(ratio)).fract().abs() != 0.5 {
                    assert_eq!(got, want, "ratio {ratio} acc {acc}");
                }
            }
        }
        assert_eq!(Requant::new(0.0).apply(1_000_000), 0);
    }

    /// Input value at `p` (channel `c`), 0 outside the volume.
    fn tap(input: &[i8], dims: Dims3, c: usize, p: [isize; 3]) -> i8 {
        if p.iter().zip(dims).any(|(&v, d)| v < 0 || v >= d as isize) {
            return 0;
        }
        input[((c * dims[0] + p[0] as usize) * dims[1] + p[1] as usize) * dims[2] + p[2] as usize]
    }

    /// Conv3d from the definition in i64 over every output and tap.
    fn conv_ref(x: &[i8], d: Dims3, ci: usize, w: &[u8], k: usize) -> Vec<i64> {
        let co = w.len() / (ci * k * k * k);
        let pad = (k / 2) as isize;
        let v = voxels(d);
        let mut out = vec![0i64; co * v];
        for o in 0..co {
            for (i, r) in out[o * v..(o + 1) * v].iter_mut().enumerate() {
                let (z, y, xx) = (i / (d[1] * d[2]), (i / d[2]) % d[1], i % d[2]);
                for c in 0..ci {
                    for t in 0..k * k * k {
                        let p = [
                            z as isize + (t / (k * k)) as isize - pad,
                            y as isize + ((t / k) % k) as isize - pad,
                            xx as isize + (t % k) as isize - pad,
                        ];
                        *r += i64::from(w[(o * ci + c) * k * k * k + t] as i8) * i64::from(tap(x, d, c, p));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn qconv3d_matches_definition_for_both_kernel_sizes() {
        let d = [5, 4, 6];
        for k in [3, 1] {
            let (ci, co) = (3, 2);
            let x = lcg_i8(ci * voxels(d), 3);
            let w: Vec<u8> = lcg_i8(co * ci * k * k * k, 4).iter().map(|&v| v as u8).collect();
            let mut acc = vec![i32::MIN; co * voxels(d)];
            let mut col = vec![0i8; qconv3d_scratch(ci, k, d)];
            let row = ci * k * k * k;
            qconv3d(&x, d, ci, (&w, row, 0), co, k, &mut acc, &mut col);
            let r = conv_ref(&x, d, ci, &w, k);
            for (i, (a, b)) in acc.iter().zip(&r).enumerate() {
                assert_eq!(i64::from(*a), *b, "k {k} output {i}");
            }
            // Input channels 1..3 alone: the rows' tail, as a concatenation's second half reads it.
            let tail: Vec<u8> =
                (0..co).flat_map(|o| w[o * row + k * k * k..(o + 1) * row].to_vec()).collect();
            qconv3d(&x[voxels(d)..], d, ci - 1, (&w, row, k * k * k), co, k, &mut acc, &mut col);
            let r = conv_ref(&x[voxels(d)..], d, ci - 1, &tail, k);
            for (i, (a, b)) in acc.iter().zip(&r).enumerate() {
                assert_eq!(i64::from(*a), *b, "k {k}, channels 1..3, output {i}");
            }
        }
    }

    #[test]
    fn qconv_transpose_up2_scatters_each_input_to_its_eight_outputs() {
        let d = [2, 3, 2];
        let (ci, co) = (3, 2);
        let x = lcg_i8(ci * voxels(d), 5);
        let w: Vec<u8> = lcg_i8(ci * co * 8, 6).iter().map(|&v| v as u8).collect();
        let ratio = 0.01f32;
        let od = d.map(|v| 2 * v);
        let mut out = vec![0i8; co * voxels(od)];
        let mut acc = vec![0i32; co * 8];
        qconv_transpose_up2(&x, d, ci, &w, |_| Requant::new(ratio), &mut out, &mut acc);
        for o in 0..co {
            for (i, &q) in out[o * voxels(od)..(o + 1) * voxels(od)].iter().enumerate() {
                let (z, y, xx) = (i / (od[1] * od[2]), (i / od[2]) % od[1], i % od[2]);
                let t = (z % 2) * 4 + (y % 2) * 2 + xx % 2;
                let src = ((z / 2) * d[1] + y / 2) * d[2] + xx / 2;
                let s: i64 = (0..ci)
                    .map(|c| i64::from(w[(c * co + o) * 8 + t] as i8) * i64::from(x[c * voxels(d) + src]))
                    .sum();
                assert_eq!(q, Requant::new(ratio).apply(s as i32), "output {o}, {i}");
                assert!((f64::from(q) - (s as f64 * 0.01).clamp(-127.0, 127.0)).abs() <= 0.5 + 1e-9);
            }
        }
    }
}
