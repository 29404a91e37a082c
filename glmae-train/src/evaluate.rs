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

/// Writes the middle axial slice (along the last array axis) as image | ground truth | prediction.
pub fn overlay_png(path: &Path, image: &glmae_data::Volume, truth: &[u8], pred: &[u8]) -> Result<()> {
    let [ni, nj, nk] = image.shape;
    let k = nk / 2;
    let mut c = Canvas::new(3 * ni, nj, [0, 0, 0]);
    for i in 0..ni {
        for j in 0..nj {
            let idx = image.index(i, j, k);
            let g = (image.data[idx].clamp(0.0, 1.0) * 255.0) as u8;
            // Radiological view: anterior up (j decreasing downward), patient's right on the left.
            let (x, y) = ((ni - 1 - i) as i64, (nj - 1 - j) as i64);
            for (panel, labels) in [(0, None), (1, Some(truth)), (2, Some(pred))] {
                let px = match labels.map(|l| l[idx]) {
                    Some(l) if l > 0 => {
                        let col = colour(l);
                        [0, 1, 2].map(|ch| ((g as u16 + col[ch] as u16) / 2) as u8)
                    }
                    _ => [g; 3],
                };
                c.set_pixel(x + (panel * ni) as i64, y, px);
            }
        }
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
        overlay_png(&out.join(format!("{name}.png")), &p.image, &truth.data, &pred)?;
        report.cases.push((name, glmae_data::sliding_window::dice_per_class(&pred, &truth.data, k)));
    }
    glmae_data::io::atomic_write(&out.join("dice.csv"), report.csv().as_bytes())?;
    glmae_data::io::atomic_write(&out.join("dice.md"), report.markdown().as_bytes())?;
    bar.finish_and_clear();
    Ok(report)
}
