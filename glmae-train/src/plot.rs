//! Line charts as PNG files (loss curves), with no plotting dependency: an RGB canvas, a 3x5
//! pixel font for labels, and a PNG encoder on flate2 and glmae-core's CRC-32.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

/// An RGB image.
pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<[u8; 3]>,
}

/// Glyphs of the 3x5 font: five rows of three bits, most significant bit on the left.
fn glyph(c: char) -> [u8; 5] {
    match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        ':' => [0, 2, 0, 2, 0],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [7, 4, 4, 4, 7],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [7, 4, 5, 5, 7],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 7],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [7, 5, 5, 5, 7],
        'P' => [7, 5, 7, 4, 4],
        'Q' => [7, 5, 5, 7, 1],
        'R' => [6, 5, 6, 5, 5],
        'S' => [7, 4, 7, 1, 7],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        _ => [0; 5],
    }
}

impl Canvas {
    /// A canvas filled with `background`.
    pub fn new(width: usize, height: usize, background: [u8; 3]) -> Self {
        Self { width, height, pixels: vec![background; width * height] }
    }

    /// Sets one pixel (ignored outside the canvas).
    pub fn set_pixel(&mut self, x: i64, y: i64, c: [u8; 3]) {
        self.set(x, y, c);
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = c;
        }
    }

    /// A line from `(x0, y0)` to `(x1, y1)` (Bresenham).
    pub fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text at `(x, y)` in the 3x5 font, scaled by `scale`.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            for (row, bits) in glyph(ch).iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.set(
                                    x + (i as i64 * 4 + col) * scale + dx,
                                    y + row as i64 * scale + dy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// PNG bytes (8-bit RGB, no interlace).
    pub fn png(&self) -> Result<Vec<u8>> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let mut body = kind.to_vec();
            body.extend_from_slice(data);
            out.extend_from_slice(&body);
            out.extend_from_slice(&glmae_core::format::crc32(&body).to_be_bytes());
        }
        let mut raw = Vec::with_capacity((self.width * 3 + 1) * self.height);
        for row in self.pixels.chunks_exact(self.width) {
            raw.push(0);
            raw.extend(row.iter().flatten());
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw)?;
        let idat = z.finish()?;
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&(self.width as u32).to_be_bytes());
        ihdr.extend_from_slice(&(self.height as u32).to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &idat);
        chunk(&mut out, b"IEND", &[]);
        Ok(out)
    }
}

/// Colours for successive series.
pub const PALETTE: [[u8; 3]; 6] =
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [90, 90, 90]];

/// Writes a line chart of `series` (name, values per step) to `path` atomically, with the y axis
/// from 0 to the largest finite value, a legend and the x range in steps.
pub fn line_chart(path: &Path, title: &str, series: &[(&str, Vec<f64>)]) -> Result<()> {
    let (w, h, left, right, top, bottom) = (800usize, 480usize, 60i64, 20i64, 40i64, 40i64);
    let mut c = Canvas::new(w, h, [255, 255, 255]);
    let (pw, ph) = (w as i64 - left - right, h as i64 - top - bottom);
    let n = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0).max(2);
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let axis = [0, 0, 0];
    c.line((left, top), (left, top + ph), axis);
    c.line((left, top + ph), (left + pw, top + ph), axis);
    c.text(left, 10, title, 3, axis);
    c.text(4, top - 2, &format!("{ymax:.3}"), 2, axis);
    c.text(4, top + ph - 10, "0", 2, axis);
    c.text(left, top + ph + 10, "0", 2, axis);
    c.text(left + pw - 60, top + ph + 10, &format!("{} STEPS", n - 1), 2, axis);
    for (k, (name, values)) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let point = |i: usize, v: f64| {
            let x = left + (i as f64 / (n - 1) as f64 * pw as f64) as i64;
            let y = top + ph - (v.clamp(0.0, ymax) / ymax * ph as f64) as i64;
            (x, y)
        };
        for i in 1..values.len() {
            if values[i - 1].is_finite() && values[i].is_finite() {
                c.line(point(i - 1, values[i - 1]), point(i, values[i]), color);
            }
        }
        let ly = top + 8 + 14 * k as i64;
        c.line((left + pw - 200, ly + 4), (left + pw - 180, ly + 4), color);
        c.text(left + pw - 172, ly, name, 2, color);
    }
    glmae_data::io::atomic_write(path, &c.png()?)
}
