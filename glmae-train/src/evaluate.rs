//! Evaluation of a fine-tuned UNETR: sliding-window inference over whole volumes, Dice per class
//! as CSV and a markdown table, and PNG slices with ground truth and prediction overlaid.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use glmae_data::{Case, VolumeCache};

use crate::finetune::Finetuner;
use crate::plot::Canvas;

/// Dice per case and class.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// Class names, background first.
    pub classes: Vec<String>,
    /// Case name and Dice for classes 1.. (`None` when absent from both maps).
    pub cases: Vec<(String, Vec<Option<f64>>)>,
}

impl Report {
    /// Mean Dice of each class over the cases where it is defined.
    pub fn class_means(&self) -> Vec<Option<f64>> {
        (0..self.classes.len().saturating_sub(1))
            .map(|c| {
                let v: Vec<f64> = self.cases.iter().filter_map(|(_, d)| d[c]).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect()
    }

    /// Mean over classes of the class means.
    pub fn mean(&self) -> f64 {
        let m: Vec<f64> = self.class_means().into_iter().flatten().collect();
        if m.is_empty() { 0.0 } else { m.iter().sum::<f64>() / m.len() as f64 }
    }

    /// `case,<class>...,mean` rows.
    pub fn csv(&self) -> String {
        let mut s = format!("case,{},mean\n", self.classes[1..].join(","));
        let fmt = |v: &Option<f64>| v.map_or(String::new(), |x| format!("{x:.4}"));
        for (name, d) in &self.cases {
            let present: Vec<f64> = d.iter().flatten().copied().collect();
            let mean =
                if present.is_empty() { 0.0 } else { present.iter().sum::<f64>() / present.len() as f64 };
            let _ = writeln!(s, "{name},{},{mean:.4}", d.iter().map(fmt).collect::<Vec<_>>().join(","));
        }
        s
    }

    /// A markdown table of the class means and the overall mean.
    pub fn markdown(&self) -> String {
        let mut s = String::from("| class | mean Dice |\n|---|---|\n");
        for (name, m) in self.classes[1..].iter().zip(self.class_means()) {
            let _ = writeln!(s, "| {name} | {} |", m.map_or("-".into(), |x| format!("{:.2}", 100.0 * x)));
        }
        let _ = writeln!(s, "| **mean** | **{:.2}** |", 100.0 * self.mean());
        s
    }
}

/// Colours for label overlays, by class index.
fn colour(c: u8) -> [u8; 3] {
    const P: [[u8; 3]; 13] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
        [220, 190, 255],
        [170, 110, 40],
    ];
    P[(c as usize + 12) % 13]
}

/// The three planes of an overlay: the axis each one cuts, and the (horizontal, vertical) axes
/// it shows, each flipped for radiological display (patient's right on the left, anterior or
/// superior up, anterior on the left in the sagittal plane).
const PLANES: [(&str, usize, usize, usize); 3] =
    [("AXIAL", 2, 0, 1), ("CORONAL", 1, 0, 2), ("SAGITTAL", 0, 1, 2)];

/// Writes an overlay a reader can check at a glance: an axial, a coronal and a sagittal slice
/// through the centre of the labelled organs, each as image | ground truth | prediction, drawn
/// at the voxel spacing and scaled up (the longest side of a panel about 300 pixels), with the
/// column titles, the slice of each row, and a legend of the organs present.
///
/// `image` holds intensities in [0, 1]; `truth` and `pred` are labels on its grid; `names` are
/// the class names by label value.
pub fn overlay_png(
    path: &Path,
    image: &glmae_data::Volume,
    truth: &[u8],
    pred: &[u8],
    names: &[String],
) -> Result<()> {
    let shape = image.shape;
    let spacing = image.affine.spacing();
    // The slices cross at the centroid of the labelled voxels (the volume's centre without any).
    let mut sum = [0f64; 3];
    let mut n = 0f64;
    for i in 0..shape[0] {
        for j in 0..shape[1] {
            for k in 0..shape[2] {
                if truth[image.index(i, j, k)] > 0 {
                    sum = [sum[0] + i as f64, sum[1] + j as f64, sum[2] + k as f64];
                    n += 1.0;
                }
            }
        }
    }
    let centre: [usize; 3] =
        std::array::from_fn(|a| if n > 0.0 { (sum[a] / n) as usize } else { shape[a] / 2 }.min(shape[a] - 1));
    let extent: [f64; 3] = std::array::from_fn(|a| shape[a] as f64 * spacing[a].max(1e-6));
    let mm_per_px = extent.iter().copied().fold(0.0, f64::max) / 300.0;
    let px = |a: usize| ((extent[a] / mm_per_px).round() as usize).max(1);
    let (gap, top, label_h, legend_row) = (8usize, 40usize, 22usize, 18usize);
    let present: Vec<u8> = (1..=u8::MAX)
        .take(names.len().saturating_sub(1))
        .filter(|c| truth.contains(c) || pred.contains(c))
        .collect();
    let width = PLANES.iter().map(|&(_, _, h, _)| 3 * px(h) + 4 * gap).max().unwrap_or(0);
    let rows_h: usize = PLANES.iter().map(|&(_, _, _, v)| px(v) + label_h).sum();
    let legend_h = legend_row * present.len().div_ceil(3).max(1) + gap;
    let mut c = Canvas::new(width, top + rows_h + legend_h, [0, 0, 0]);
    let white = [255, 255, 255];
    let (w0, h0) = (px(PLANES[0].2), 0);
    for (col, title) in ["IMAGE", "GROUND TRUTH", "PREDICTION"].iter().enumerate() {
        c.text((gap + col * (w0 + gap)) as i64, 12 + h0, title, 3, white);
    }
    let mut y0 = top;
    for &(name, cut, h, v) in &PLANES {
        let (pw, ph) = (px(h), px(v));
        c.text(
            gap as i64,
            y0 as i64 + 2,
            &format!("{name} SLICE {} OF {}", centre[cut], shape[cut]),
            2,
            white,
        );
        let y_img = y0 + label_h;
        for y in 0..ph {
            for x in 0..pw {
                // Pixel centre in mm along the shown axes, then flipped for display.
                let ih = (((x as f64 + 0.5) * mm_per_px / spacing[h]) as usize).min(shape[h] - 1);
                let iv = (((y as f64 + 0.5) * mm_per_px / spacing[v]) as usize).min(shape[v] - 1);
                let mut idx3 = centre;
                idx3[h] = shape[h] - 1 - ih;
                idx3[v] = shape[v] - 1 - iv;
                let idx = image.index(idx3[0], idx3[1], idx3[2]);
                let g = (image.data[idx].clamp(0.0, 1.0) * 255.0) as u8;
                for (panel, labels) in [(0usize, None), (1, Some(truth)), (2, Some(pred))] {
                    let colour_px = match labels.map(|l| l[idx]) {
                        Some(l) if l > 0 => {
                            let col = colour(l);
                            [0, 1, 2].map(|ch| ((g as u16 * 2 + col[ch] as u16 * 3) / 5) as u8)
                        }
                        _ => [g; 3],
                    };
                    c.set_pixel((gap + panel * (pw + gap) + x) as i64, (y_img + y) as i64, colour_px);
                }
            }
        }
        y0 = y_img + ph;
    }
    // Legend: a colour swatch and the class name, three to a row.
    let col_w = (width - gap) / 3;
    for (n, &cls) in present.iter().enumerate() {
        let (lx, ly) = (gap + (n % 3) * col_w, y0 + gap + (n / 3) * legend_row);
        for dy in 0..12 {
            for dx in 0..12 {
                c.set_pixel((lx + dx) as i64, (ly + dy) as i64, colour(cls));
            }
        }
        let label = names.get(cls as usize).map_or_else(|| format!("class {cls}"), |s| s.replace('_', " "));
        c.text(lx as i64 + 18, ly as i64 + 1, &label, 2, white);
    }
    glmae_data::io::atomic_write(path, &c.png()?)
}

/// Evaluates `ft` on `cases` (labelled), writing `dice.csv`, `dice.md` and one PNG per case into
/// `out`.
pub fn evaluate(ft: &Finetuner, cases: &[Case], out: &Path) -> Result<Report> {
    evaluate_with_progress(ft, cases, out, &indicatif::ProgressBar::hidden())
}

/// [`evaluate`], advancing `bar` by one per sliding window (its length grows as each case is
/// loaded, since the window count depends on the resampled shape).
pub fn evaluate_with_progress(
    ft: &Finetuner,
    cases: &[Case],
    out: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<Report> {
    ensure!(!cases.is_empty(), "no cases to evaluate");
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cache = VolumeCache::new(ft.cfg.preprocessing.clone(), None);
    let k = ft.cfg.unetr.out_channels as usize;
    let mut report = Report { classes: ft.cfg.class_names.clone(), cases: Vec::new() };
    for c in cases {
        let p = cache.get(c)?;
        let truth = p
            .labels
            .as_ref()
            .with_context(|| format!("{} has no label to evaluate against", c.image.display()))?;
        bar.inc_length(glmae_data::sliding_window::window_count(p.image.shape, &ft.cfg.window()) as u64);
        let pred = ft.predict_observed(&p.image, &|| bar.inc(1))?;
        let name = c
            .image
            .file_name()
            .map(|n| n.to_string_lossy().replace(".nii.gz", "").replace(".nii", ""))
            .unwrap_or_default();
        overlay_png(&out.join(format!("{name}.png")), &p.image, &truth.data, &pred, &ft.cfg.class_names)?;
        report.cases.push((name, glmae_data::sliding_window::dice_per_class(&pred, &truth.data, k)));
    }
    glmae_data::io::atomic_write(&out.join("dice.csv"), report.csv().as_bytes())?;
    glmae_data::io::atomic_write(&out.join("dice.md"), report.markdown().as_bytes())?;
    bar.finish_and_clear();
    Ok(report)
}
