//! Writes `docs/phantoms.png`: six synthetic CT phantoms side by side, an axial slice (top row) and
//! a coronal slice (bottom row) through the kidneys, or through the largest lesion where there is
//! one; HU window [-175, 250], one pixel per millimetre, seed, phase and lesion count under each.
//!
//! `cargo run --release -p glmae-data --example phantom_gallery [OUT.png] [SEED ...]`
//!
//! Self-contained: a minimal PNG encoder (zlib from `flate2`, CRC-32 below) and a 5 x 7 bitmap
//! font, so remaking the figure needs nothing beyond the crate's own dependencies.

use std::io::Write;

use anyhow::{Context, Result};
use flate2::Compression;
use flate2::write::ZlibEncoder;
use glmae_data::phantom::{Phantom, PhantomConfig, generate};

/// Two seeds of each phase, among them lesions, wide (truncated) bodies, thin ones and a
/// reconstruction circle (seed 0); chosen by looking at the first 30 seeds.
const DEFAULT_SEEDS: [u64; 6] = [0, 19, 23, 21, 17, 16];
const WINDOW: [f32; 2] = [-175.0, 250.0];
const KIDNEY_R: u8 = 2;
const KIDNEY_L: u8 = 3;

/// Text scale (pixels per font pixel) and layout margins, in pixels.
const TEXT_SCALE: usize = 2;
const GAP: usize = 12;
const LINE: usize = 9 * TEXT_SCALE;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let out = args.next().unwrap_or_else(|| "docs/phantoms.png".into());
    let seeds: Vec<u64> =
        args.map(|a| a.parse().with_context(|| format!("seed {a:?}"))).collect::<Result<_>>()?;
    let seeds = if seeds.is_empty() { DEFAULT_SEEDS.to_vec() } else { seeds };

    let cfg = PhantomConfig::default();
    let phantoms: Vec<(u64, Phantom)> = seeds.iter().map(|&s| (s, generate(s, &cfg))).collect();
    let panel_w = mm(cfg.shape[0], cfg.spacing[0]);
    let axial_h = mm(cfg.shape[1], cfg.spacing[1]);
    let coronal_h = mm(cfg.shape[2], cfg.spacing[2]);
    let title_h = GAP + 2 * LINE;
    let caption_h = 2 * LINE + GAP;
    let width = GAP + phantoms.len() * (panel_w + GAP);
    let height = title_h + axial_h + GAP + coronal_h + caption_h;
    let mut img = Image { width, height, px: vec![0; width * height] };

    img.text(
        GAP,
        GAP,
        "GLMAE SYNTHETIC CT PHANTOMS: AXIAL (TOP) AND CORONAL (BOTTOM), AT THE KIDNEYS OR THE LARGEST LESION",
    );
    img.text(GAP, GAP + LINE, "WINDOW -175..250 HU, 1 PIXEL PER MM, PATIENT'S RIGHT ON THE LEFT");
    for (n, (seed, p)) in phantoms.iter().enumerate() {
        let x0 = GAP + n * (panel_w + GAP);
        let (k, j) = slices(p);
        let [n0, n1, n2] = p.shape;
        let at = |i: usize, j: usize, k: usize| p.hu[(i * n1 + j) * n2 + k];
        // Radiological view: patient's right on the image's left, anterior (axial) or superior
        // (coronal) at the top; nearest-neighbour resampling to 1 mm.
        let col = |c: usize| n0 - 1 - (c as f32 / p.spacing[0]) as usize;
        for r in 0..axial_h {
            let jj = n1 - 1 - (r as f32 / p.spacing[1]) as usize;
            for c in 0..panel_w {
                img.set(x0 + c, title_h + r, grey(at(col(c), jj, k)));
            }
        }
        let y0 = title_h + axial_h + GAP;
        for r in 0..coronal_h {
            let kk = n2 - 1 - (r as f32 / p.spacing[2]) as usize;
            for c in 0..panel_w {
                img.set(x0 + c, y0 + r, grey(at(col(c), j, kk)));
            }
        }
        let y = y0 + coronal_h + GAP / 2;
        img.text(x0, y, &format!("SEED {seed}  {}", p.phase.name().to_uppercase()));
        let lesions = match p.lesions.len() {
            0 => "NO LESION".to_string(),
            1 => "1 LESION".to_string(),
            l => format!("{l} LESIONS"),
        };
        img.text(x0, y + LINE, &lesions);
    }
    std::fs::write(&out, img.png()?).with_context(|| format!("writing {out}"))?;
    println!("wrote {out} ({width} x {height})");
    Ok(())
}

/// Pixels covering `n` voxels of `spacing` mm at one pixel per millimetre.
fn mm(n: usize, spacing: f32) -> usize {
    (n as f32 * spacing).floor() as usize
}

/// Axial and coronal slice indices (k, j): through the centre of the largest lesion if there is
/// one, else the axial slice with the most kidney voxels and the coronal slice at their mean j.
fn slices(p: &Phantom) -> (usize, usize) {
    if let Some(l) = p.lesions.iter().max_by_key(|l| l.voxels) {
        return (l.centre[2], l.centre[1]);
    }
    let [_, n1, n2] = p.shape;
    let mut per_k = vec![0usize; n2];
    let (mut j_sum, mut count) = (0usize, 0usize);
    for (idx, &l) in p.labels.iter().enumerate() {
        if l == KIDNEY_R || l == KIDNEY_L {
            per_k[idx % n2] += 1;
            j_sum += (idx / n2) % n1;
            count += 1;
        }
    }
    let k = (0..n2).max_by_key(|&k| per_k[k]).unwrap_or(n2 / 2);
    let j = j_sum.checked_div(count).unwrap_or(n1 / 2);
    (k, j)
}

fn grey(hu: f32) -> u8 {
    ((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) * 255.0).clamp(0.0, 255.0).round() as u8
}

/// 8-bit greyscale image.
struct Image {
    width: usize,
    height: usize,
    px: Vec<u8>,
}

impl Image {
    fn set(&mut self, x: usize, y: usize, v: u8) {
        if x < self.width && y < self.height {
            self.px[y * self.width + x] = v;
        }
    }

    /// White text, top-left corner at (x, y); characters without a glyph are left blank.
    fn text(&mut self, x: usize, y: usize, s: &str) {
        for (n, ch) in s.chars().enumerate() {
            let rows = glyph(ch.to_ascii_uppercase());
            for (r, row) in rows.iter().enumerate() {
                for (c, bit) in row.bytes().enumerate() {
                    if bit != b'#' {
                        continue;
                    }
                    for dy in 0..TEXT_SCALE {
                        for dx in 0..TEXT_SCALE {
                            let px = x + (n * 6 + c) * TEXT_SCALE + dx;
                            self.set(px, y + r * TEXT_SCALE + dy, 255);
                        }
                    }
                }
            }
        }
    }

    /// The image as a PNG file: greyscale, 8 bits, no filtering.
    fn png(&self) -> Result<Vec<u8>> {
        let mut raw = Vec::with_capacity((self.width + 1) * self.height);
        for row in self.px.chunks(self.width.max(1)) {
            raw.push(0);
            raw.extend_from_slice(row);
        }
        let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
        z.write_all(&raw)?;
        let idat = z.finish()?;

        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&u32::try_from(self.width)?.to_be_bytes());
        ihdr.extend_from_slice(&u32::try_from(self.height)?.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // bit depth 8, greyscale, deflate, no filter, no interlace
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [(b"IHDR", &ihdr), (b"IDAT", &idat), (b"IEND", &Vec::new())] {
            png.extend_from_slice(&u32::try_from(data.len())?.to_be_bytes());
            let start = png.len();
            png.extend_from_slice(kind);
            png.extend_from_slice(data);
            let crc = crc32(&png[start..]);
            png.extend_from_slice(&crc.to_be_bytes());
        }
        Ok(png)
    }
}

/// CRC-32 (IEEE, reflected), as PNG chunks use; bitwise, which is plenty for one image.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// 5 x 7 glyphs for the characters the captions use.
fn glyph(c: char) -> [&'static str; 7] {
    match c {
        'A' => [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
        'B' => ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."],
        'C' => [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."],
        'D' => ["####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."],
        'E' => ["#####", "#....", "#....", "####.", "#....", "#....", "#####"],
        'F' => ["#####", "#....", "#....", "####.", "#....", "#....", "#...."],
        'G' => [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"],
        'H' => ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
        'I' => [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."],
        'J' => ["..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."],
        'K' => ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"],
        'L' => ["#....", "#....", "#....", "#....", "#....", "#....", "#####"],
        'M' => ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"],
        'N' => ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"],
        'O' => [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
        'P' => ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."],
        'Q' => [".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"],
        'R' => ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"],
        'S' => [".####", "#....", "#....", ".###.", "....#", "....#", "####."],
        'T' => ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."],
        'U' => ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
        'V' => ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."],
        'W' => ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."],
        'X' => ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"],
        'Y' => ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."],
        'Z' => ["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"],
        '0' => [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
        '1' => ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
        '2' => [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
        '3' => ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
        '4' => ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
        '5' => ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
        '6' => ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
        '7' => ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
        '8' => [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
        '9' => [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
        '-' => [".....", ".....", ".....", "#####", ".....", ".....", "....."],
        '.' => [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."],
        ',' => [".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."],
        ':' => [".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."],
        '\'' => ["..#..", "..#..", ".#...", ".....", ".....", ".....", "....."],
        '(' => ["...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."],
        ')' => [".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."],
        _ => ["....."; 7],
    }
}
