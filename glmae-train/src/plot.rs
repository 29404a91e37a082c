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

/// Writes the columns of a run's CSV (`metrics.csv`, `validation.csv`) against its `step` column
/// as one panel of [`panels_chart`] to `png`. `columns` pairs a legend name with a column name;
/// a missing column is an error naming the file.
pub fn csv_chart(csv: &Path, png: &Path, title: &str, columns: &[(&str, &str)]) -> Result<()> {
    let table = read_csv(csv)?;
    let mut series = Vec::with_capacity(columns.len());
    for &(name, column) in columns {
        let values = table
            .column(column)
            .ok_or_else(|| anyhow::anyhow!("{} has no column {column:?}", csv.display()))?;
        series.push((name, values));
    }
    panels_chart(png, &table.x("step"), &[Panel { title, y_label: "", series }])
}

/// One chart of a [`panels_chart`] figure.
pub struct Panel<'a> {
    /// Title above the panel.
    pub title: &'a str,
    /// Label of the y axis (drawn above its tick labels).
    pub y_label: &'a str,
    /// Named series, one value per x.
    pub series: Vec<(&'a str, Vec<f64>)>,
}

/// Writes panels stacked vertically, sharing the x axis `x` (steps), to `path` atomically. Each
/// panel has a y axis from 0 to its largest finite value with ticks and labels, x ticks labelled
/// in steps, an x-axis label, and a legend.
pub fn panels_chart(path: &Path, x: &[f64], panels: &[Panel<'_>]) -> Result<()> {
    let (w, ph_total) = (900usize, 380usize);
    let h = ph_total * panels.len().max(1);
    let mut c = Canvas::new(w, h, [255, 255, 255]);
    for (k, panel) in panels.iter().enumerate() {
        draw_panel(&mut c, (0, (k * ph_total) as i64), (w as i64, ph_total as i64), x, panel);
    }
    glmae_data::io::atomic_write(path, &c.png()?)
}

/// A "nice" tick spacing (1, 2 or 5 times a power of ten) giving about `target` ticks over `span`.
fn tick_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(1e-12);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    mag * if f < 1.5 {
        1.0
    } else if f < 3.5 {
        2.0
    } else if f < 7.5 {
        5.0
    } else {
        10.0
    }
}

/// A tick label with as many decimals as the spacing needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

/// Ticks of an x axis in steps from `xmin` to `xmax`: about six, at whole steps only (a run
/// validated at steps 100, 200 and 300 gets ticks 100, 120, ... 300, not one per row).
fn step_ticks(xmin: f64, xmax: f64) -> Vec<(f64, String)> {
    let xs = tick_step(xmax - xmin, 6.0).max(1.0);
    let mut ticks = Vec::new();
    let mut t = (xmin / xs).ceil() * xs;
    while t <= xmax * (1.0 + 1e-9) {
        ticks.push((t, tick_label(t, xs)));
        t += xs;
    }
    ticks
}

fn draw_panel(c: &mut Canvas, (ox, oy): (i64, i64), (w, h): (i64, i64), x: &[f64], panel: &Panel<'_>) {
    let (left, right, top, bottom) = (80i64, 20i64, 44i64, 48i64);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let (x0, y0) = (ox + left, oy + top);
    let axis = [0, 0, 0];
    let grid = [225, 225, 225];
    let finite = |v: &&f64| v.is_finite();
    let xmin = x.iter().filter(finite).copied().fold(f64::INFINITY, f64::min);
    let xmax = x.iter().filter(finite).copied().fold(f64::NEG_INFINITY, f64::max);
    let (xmin, xmax) = if xmin.is_finite() && xmax > xmin { (xmin, xmax) } else { (0.0, 1.0) };
    let ymax = panel
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let px = |v: f64| x0 + ((v - xmin) / (xmax - xmin) * pw as f64).round() as i64;
    let py = |v: f64| y0 + ph - (v.clamp(0.0, ymax) / ymax * ph as f64).round() as i64;
    // Grid lines and ticks first, so the data is drawn over them.
    let ys = tick_step(ymax, 5.0);
    let mut t = 0.0;
    while t <= ymax * (1.0 + 1e-9) {
        let y = py(t);
        c.line((x0 + 1, y), (x0 + pw, y), grid);
        c.line((x0 - 5, y), (x0, y), axis);
        let label = tick_label(t, ys);
        c.text(x0 - 8 - 8 * label.len() as i64, y - 5, &label, 2, axis);
        t += ys;
    }
    for (t, label) in step_ticks(xmin, xmax) {
        let xp = px(t);
        c.line((xp, y0 + ph), (xp, y0 + ph + 5), axis);
        c.text(xp - 4 * label.len() as i64, y0 + ph + 9, &label, 2, axis);
    }
    c.line((x0, y0), (x0, y0 + ph), axis);
    c.line((x0, y0 + ph), (x0 + pw, y0 + ph), axis);
    c.text(x0, oy + 8, panel.title, 3, axis);
    c.text(ox + 4, y0 - 20, panel.y_label, 2, axis);
    c.text(x0 + pw / 2 - 16, y0 + ph + 28, "STEP", 2, axis);
    for (k, (name, values)) in panel.series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        for i in 1..values.len().min(x.len()) {
            let (a, b) = (values[i - 1], values[i]);
            if a.is_finite() && b.is_finite() && x[i - 1].is_finite() && x[i].is_finite() {
                c.line((px(x[i - 1]), py(a)), (px(x[i]), py(b)), color);
            }
        }
        let ly = y0 + 8 + 14 * k as i64;
        c.line((x0 + pw - 200, ly + 4), (x0 + pw - 180, ly + 4), color);
        c.text(x0 + pw - 172, ly, name, 2, color);
    }
}

/// A CSV file of numbers with a header row (the runs' `metrics.csv`, `validation.csv`).
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<f64>>,
}

/// Reads a CSV of numbers; cells that do not parse read as NaN.
pub fn read_csv(path: &Path) -> Result<Table> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let mut lines = text.lines();
    let header = lines.next().unwrap_or("").split(',').map(|h| h.trim().to_string()).collect();
    let rows = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').map(|c| c.trim().parse().unwrap_or(f64::NAN)).collect())
        .collect();
    Ok(Table { header, rows })
}

impl Table {
    /// The column named `name` (NaN where a row is short), or `None` if there is no such column.
    pub fn column(&self, name: &str) -> Option<Vec<f64>> {
        let k = self.header.iter().position(|h| h == name)?;
        Some(self.rows.iter().map(|r| r.get(k).copied().unwrap_or(f64::NAN)).collect())
    }

    /// The column `name` as the x axis, or the row index when there is no such column.
    pub fn x(&self, name: &str) -> Vec<f64> {
        self.column(name).unwrap_or_else(|| (0..self.rows.len()).map(|i| i as f64).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round_numbers() {
        assert_eq!(tick_step(4.85, 5.0), 1.0);
        assert_eq!(tick_step(0.02, 5.0), 0.005);
        assert_eq!(tick_step(800.0, 6.0), 100.0);
        assert_eq!(tick_label(0.005, 0.005), "0.005");
        assert_eq!(tick_label(300.0, 100.0), "300");
    }

    #[test]
    fn step_ticks_are_whole_steps_in_range() {
        let labels = |a, b| step_ticks(a, b).into_iter().map(|(_, l)| l).collect::<Vec<_>>();
        // Three validations: ticks in steps, not the rows' indices 0, 1, 2.
        let t = labels(100.0, 300.0);
        assert_eq!((t.first().unwrap().as_str(), t.last().unwrap().as_str(), t.len()), ("100", "300", 11));
        // A two-step run has no fractional ticks (there were five labelled "0" or "1").
        assert_eq!(labels(0.0, 2.0), ["0", "1", "2"]);
    }

    #[test]
    fn csv_chart_names_a_missing_column() {
        let dir = std::env::temp_dir().join(format!("glmae-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("validation.csv");
        std::fs::write(&csv, "step,mean_dice\n100,0.1\n200,0.3\n").unwrap();
        let png = dir.join("v.png");
        csv_chart(&csv, &png, "T", &[("dice", "mean_dice")]).unwrap();
        assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
        let err = csv_chart(&csv, &png, "T", &[("ce", "ce")]).unwrap_err().to_string();
        assert!(err.contains("validation.csv") && err.contains("\"ce\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
