//! Datasets as users keep them: MSD/MONAI `dataset.json` files, plain folders of images for
//! unlabelled pretraining, and the BTCV split.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::nifti_io::read_nifti;

/// One case: an image and, when labelled, its label map.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Case {
    /// Image file.
    pub image: PathBuf,
    /// Label file.
    pub label: Option<PathBuf>,
}

/// A dataset split into the MSD/MONAI lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dataset {
    /// Dataset name.
    pub name: String,
    /// Class names by label value.
    pub labels: BTreeMap<u32, String>,
    /// Training cases.
    pub training: Vec<Case>,
    /// Validation cases (MONAI's extension of MSD's format).
    pub validation: Vec<Case>,
    /// Test images, unlabelled.
    pub test: Vec<Case>,
}

fn case_from(v: &Value, root: &Path, list: &str, n: usize) -> Result<Case> {
    let resolve = |s: &str| {
        let p = Path::new(s);
        if p.is_absolute() { p.to_path_buf() } else { root.join(p.strip_prefix("./").unwrap_or(p)) }
    };
    match v {
        Value::String(s) => Ok(Case { image: resolve(s), label: None }),
        Value::Object(o) => {
            let image = o
                .get("image")
                .and_then(Value::as_str)
                .with_context(|| format!("{list}[{n}] has no \"image\" path"))?;
            let label = o.get("label").and_then(Value::as_str).map(resolve);
            Ok(Case { image: resolve(image), label })
        }
        _ => bail!("{list}[{n}] is neither a path nor an object with \"image\""),
    }
}

impl Dataset {
    /// Reads an MSD/MONAI `dataset.json`; paths are relative to the file's folder.
    pub fn from_json(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
        let root = path.parent().unwrap_or(Path::new("."));
        let list = |key: &str| -> Result<Vec<Case>> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(a)) => {
                    a.iter().enumerate().map(|(n, c)| case_from(c, root, key, n)).collect()
                }
                Some(_) => bail!("\"{key}\" is not a list"),
            }
        };
        let mut labels = BTreeMap::new();
        if let Some(Value::Object(m)) = v.get("labels") {
            for (k, name) in m {
                let idx: u32 =
                    k.trim().parse().with_context(|| format!("label key {k:?} is not a number"))?;
                labels.insert(idx, name.as_str().unwrap_or_default().to_string());
            }
        }
        let ds = Self {
            name: v.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
            labels,
            training: list("training").with_context(|| format!("{}", path.display()))?,
            validation: list("validation").with_context(|| format!("{}", path.display()))?,
            test: list("test").with_context(|| format!("{}", path.display()))?,
        };
        Ok(ds)
    }

    /// Writes an MSD-style `dataset.json` with paths relative to `folder`.
    pub fn to_json(&self, folder: &Path) -> Result<String> {
        let rel = |p: &Path| -> String {
            let r = p.strip_prefix(folder).unwrap_or(p);
            format!("./{}", r.display())
        };
        let cases = |cs: &[Case]| -> Vec<Value> {
            cs.iter()
                .map(|c| match &c.label {
                    Some(l) => serde_json::json!({"image": rel(&c.image), "label": rel(l)}),
                    None => serde_json::json!({"image": rel(&c.image)}),
                })
                .collect()
        };
        let labels: serde_json::Map<String, Value> =
            self.labels.iter().map(|(k, v)| (k.to_string(), Value::String(v.clone()))).collect();
        let v = serde_json::json!({
            "name": self.name,
            "modality": {"0": "CT"},
            "labels": labels,
            "numTraining": self.training.len(),
            "training": cases(&self.training),
            "validation": cases(&self.validation),
            "test": self.test.iter().map(|c| rel(&c.image)).collect::<Vec<_>>(),
        });
        Ok(serde_json::to_string_pretty(&v)?)
    }

    /// Every image in one or more folders (searched recursively for `.nii` and `.nii.gz`), for
    /// unlabelled pretraining. Folders named like `labelsTr` are skipped.
    pub fn from_folders(roots: &[PathBuf]) -> Result<Self> {
        let mut images = Vec::new();
        for root in roots {
            ensure_dir(root)?;
            collect_images(root, &mut images)?;
        }
        images.sort();
        if images.is_empty() {
            bail!(
                "no .nii or .nii.gz files under {}",
                roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
            );
        }
        let training = images.into_iter().map(|image| Case { image, label: None }).collect();
        Ok(Self { name: "images".into(), training, ..Self::default() })
    }

    /// A `dataset.json` file or a folder of images (several folders separated by commas).
    pub fn open(spec: &str) -> Result<Self> {
        let p = Path::new(spec);
        if p.is_file() {
            return Self::from_json(p);
        }
        let roots: Vec<PathBuf> = spec.split(',').map(PathBuf::from).collect();
        Self::from_folders(&roots)
    }

    /// BTCV's split (UNETR, GL-MAE): cases `img0035`-`img0040` validate, the other labelled cases
    /// train. Cases not named `img00NN` keep their lists.
    pub fn btcv_split(&self) -> Self {
        let is_val = |c: &Case| {
            let stem = c.image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            stem.strip_prefix("img")
                .and_then(|s| s.get(..4))
                .and_then(|s| s.parse::<u32>().ok())
                .is_some_and(|n| (35..=40).contains(&n))
        };
        let all: Vec<Case> = self.training.iter().chain(&self.validation).cloned().collect();
        let (validation, training): (Vec<Case>, Vec<Case>) = all.into_iter().partition(is_val);
        Self { training, validation, ..self.clone() }
    }

    /// Opens every file and reports every problem at once: missing or unreadable files, label
    /// grids that differ from their image, empty label maps, labels outside the class list.
    pub fn scan(&self) -> Result<()> {
        let cases: Vec<&Case> = self.training.iter().chain(&self.validation).chain(&self.test).collect();
        let workers = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        let problems: Vec<String> = crate::parallel::map_indexed(
            cases.len(),
            workers,
            || vec!["a scan worker crashed".to_string()],
            |i| self.check_case(cases[i]),
        )
        .into_iter()
        .flatten()
        .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{} problem(s) in dataset {:?}:\n  {}", problems.len(), self.name, problems.join("\n  "))
        }
    }

    fn check_case(&self, c: &Case) -> Vec<String> {
        let mut out = Vec::new();
        let image = match read_nifti(&c.image) {
            Ok(i) => Some(i),
            Err(e) => {
                out.push(format!("{e:#}"));
                None
            }
        };
        let Some(label_path) = &c.label else { return out };
        let label = match read_nifti(label_path) {
            Ok(l) => l,
            Err(e) => {
                out.push(format!("{e:#}"));
                return out;
            }
        };
        let lv = &label.volume;
        if let Some(img) = &image {
            let iv = &img.volume;
            let same_affine = iv
                .affine
                .0
                .iter()
                .flatten()
                .zip(lv.affine.0.iter().flatten())
                .all(|(a, b)| (a - b).abs() <= 1e-3 * a.abs().max(1.0));
            if iv.shape != lv.shape || !same_affine {
                out.push(format!(
                    "{}: label grid {:?} (spacing {:?}) differs from its image {} grid {:?} (spacing {:?})",
                    label_path.display(),
                    lv.shape,
                    lv.spacing(),
                    c.image.display(),
                    iv.shape,
                    iv.spacing()
                ));
            }
        }
        if !lv.data.iter().any(|&v| v > 0.0) {
            out.push(format!("{}: label map is empty (no voxel above 0)", label_path.display()));
        }
        if let Some(v) = lv.data.iter().find(|&&v| v < 0.0 || v.fract() != 0.0 || v > 255.0) {
            out.push(format!("{}: label value {v} is not a class index 0-255", label_path.display()));
        } else if let Some(&max_class) = self.labels.keys().last()
            && let Some(v) = lv.data.iter().find(|&&v| v as u32 > max_class)
        {
            out.push(format!(
                "{}: label {v} is not among the dataset's classes 0-{max_class}",
                label_path.display()
            ));
        }
        out
    }
}

fn ensure_dir(root: &Path) -> Result<()> {
    if !root.is_dir() {
        bail!("{} is not a folder or a dataset.json file", root.display());
    }
    Ok(())
}

/// Whether `path` names a NIfTI image by the rule every folder listing uses: a `.nii` or
/// `.nii.gz` file name that is not hidden (macOS's `._x.nii.gz` resource forks are not images).
pub fn is_nifti_name(path: &Path) -> bool {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    (name.ends_with(".nii") || name.ends_with(".nii.gz")) && !name.starts_with('.')
}

/// The NIfTI images directly in `dir` (no sub-folders), sorted by path: a folder of inputs to
/// segment.
pub fn nifti_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut out = Vec::new();
    for e in entries {
        let p = e.with_context(|| format!("cannot list {}", dir.display()))?.path();
        if !p.is_dir() && is_nifti_name(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The NIfTI images under `dir` and its sub-folders, except folders named `labels*`: a folder
/// of unlabelled images to pretrain on.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let not_labels = |p: &Path| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("labels"));
    walk_files(dir, &not_labels, &is_nifti_name, out)
}

/// Appends the files under `dir` that `keep` accepts, descending into the sub-folders that
/// `descend` accepts: the one recursive listing (NIfTI folders, DICOM folders).
pub fn walk_files(
    dir: &Path,
    descend: &dyn Fn(&Path) -> bool,
    keep: &dyn Fn(&Path) -> bool,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in entries {
        let p = e.with_context(|| format!("cannot list {}", dir.display()))?.path();
        if p.is_dir() {
            if descend(&p) {
                walk_files(&p, descend, keep, out)?;
            }
        } else if keep(&p) {
            out.push(p);
        }
    }
    Ok(())
}
