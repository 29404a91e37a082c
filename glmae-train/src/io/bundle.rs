//! MONAI bundles (the layout of MONAI's model zoo): `configs/inference.json` for the inference
//! transforms and the network's arguments, `configs/metadata.json` for the class names,
//! `models/model.pt` for the weights.
//!
//! A bundle's config is a MONAI "ConfigParser" document: objects with `_target_` are components,
//! `"@name"` refers to another entry (`"@a::b"` or the older `"@a#b"` to a nested one) and
//! `"$..."` is a Python expression. We resolve references and read literals; a value we need that
//! is an expression is an error that names it and the flag that replaces it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::io::import::ImportPreprocessing;

/// What a bundle says about a UNETR: its weights and what its configs say.
#[derive(Clone, Debug, PartialEq)]
pub struct Bundle {
    /// `models/model.pt` (or `model.safetensors`).
    pub weights: PathBuf,
    /// What `configs/inference.json` (and `metadata.json`'s class names) say.
    pub config: InferenceConfig,
}

/// The values `import` takes from a bundle's configs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InferenceConfig {
    /// The inference transforms and window, as `import`'s choices.
    pub preprocessing: ImportPreprocessing,
    /// `network_def`'s `num_heads` (MONAI's default 12 when absent).
    pub num_heads: Option<u32>,
    /// One line per value read, for the import log: `Spacingd pixdim = [1.5, 1.5, 2.0]`.
    pub notes: Vec<String>,
}

/// True when `path` is a folder holding `configs/inference.json`.
pub fn is_bundle(path: &Path) -> bool {
    path.join("configs").join("inference.json").is_file()
}

/// Reads the bundle in folder `dir`.
pub fn read_bundle(dir: &Path) -> Result<Bundle> {
    let config_path = dir.join("configs").join("inference.json");
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!("cannot read {} (a MONAI bundle's inference config)", config_path.display())
    })?;
    let config: Value = serde_json::from_str(&text).with_context(|| {
        format!("{}: not JSON (YAML configs are not read; convert it)", config_path.display())
    })?;
    let weights = ["model.pt", "model.safetensors"]
        .iter()
        .map(|f| dir.join("models").join(f))
        .find(|p| p.is_file())
        .with_context(|| format!("{}: no models/model.pt or models/model.safetensors", dir.display()))?;
    let mut config = from_config(&config, &config_path.display().to_string())?;
    let metadata = dir.join("configs").join("metadata.json");
    if metadata.is_file()
        && let Some(names) = class_names(&metadata)?
    {
        config.notes.push(format!("metadata.json channel_def: {} classes", names.len()));
        config.preprocessing.classes = Some(names);
    }
    Ok(Bundle { weights, config })
}

/// The preprocessing and network arguments of a parsed `inference.json`; `name` labels errors.
pub fn from_config(config: &Value, name: &str) -> Result<InferenceConfig> {
    let root = config.as_object().with_context(|| format!("{name}: the config is not a JSON object"))?;
    let resolver = Resolver { root: config, name };
    let mut components = Vec::new();
    collect_components(config, &resolver, 0, &mut components)?;
    let find = |target: &str| -> Vec<&serde_json::Map<String, Value>> {
        components.iter().copied().filter(|c| target_name(c) == Some(target)).collect()
    };
    let mut prep = ImportPreprocessing::default();
    let mut notes = Vec::new();

    let one = |target: &str| -> Result<Option<&serde_json::Map<String, Value>>> {
        let found = find(target);
        ensure!(
            found.len() <= 1,
            "{name}: {} {target} transforms; which one applies is ambiguous",
            found.len()
        );
        Ok(found.first().copied())
    };
    if let Some(t) = one("Orientationd")? {
        let codes = resolver.string(t, "axcodes", "Orientationd")?;
        notes.push(format!("Orientationd axcodes = {codes}"));
        prep.orientation = Some(codes);
    }
    if let Some(t) = one("Spacingd")? {
        let v = resolver.numbers(t, "pixdim", "Spacingd", "--spacing")?;
        ensure!(v.len() == 3, "{name}: Spacingd pixdim has {} values, expected 3", v.len());
        notes.push(format!("Spacingd pixdim = {v:?}"));
        prep.spacing = Some([v[0] as f32, v[1] as f32, v[2] as f32]);
    }
    if let Some(t) = one("ScaleIntensityRanged")? {
        let mut w = [0f32; 4];
        for (i, key) in ["a_min", "a_max", "b_min", "b_max"].iter().enumerate() {
            let v = resolver.numbers(t, key, "ScaleIntensityRanged", "--intensity")?;
            ensure!(v.len() == 1, "{name}: ScaleIntensityRanged {key} must be one number");
            w[i] = v[0] as f32;
        }
        // MONAI's default for `clip` is false.
        let clip = match t.get("clip") {
            None => false,
            Some(v) => resolver.resolve(v)?.as_bool().with_context(|| {
                format!("{name}: ScaleIntensityRanged clip is not true/false; give --clip")
            })?,
        };
        notes.push(format!("ScaleIntensityRanged [{}, {}] -> [{}, {}], clip {clip}", w[0], w[1], w[2], w[3]));
        prep.intensity = Some(w);
        prep.clip = Some(clip);
    }
    // Inference without CropForegroundd runs on the whole volume.
    let crop = one("CropForegroundd")?.is_some();
    notes.push(format!("CropForegroundd {}", if crop { "present" } else { "absent: no crop" }));
    prep.crop = Some(crop);
    let inferers: Vec<_> = find("SlidingWindowInferer");
    if let Some(t) = inferers.first() {
        let v = resolver.numbers(t, "roi_size", "SlidingWindowInferer", "--roi")?;
        ensure!(
            !v.is_empty() && v.iter().all(|&x| x == v[0] && x > 0.0 && x.fract() == 0.0),
            "{name}: SlidingWindowInferer roi_size {v:?} is not a cubic window; glmae runs cubic windows"
        );
        notes.push(format!("SlidingWindowInferer roi_size = {}", v[0]));
        prep.roi = Some(v[0] as u32);
    }
    let mut num_heads = None;
    let nets: Vec<_> = find("UNETR");
    ensure!(
        !nets.is_empty() || !root.contains_key("network_def"),
        "{name}: network_def is not a MONAI UNETR (target {:?}); only UNETR imports",
        root.get("network_def").and_then(|n| n.get("_target_"))
    );
    if let Some(net) = nets.first()
        && net.contains_key("num_heads")
    {
        let v = resolver.numbers(net, "num_heads", "UNETR", "--heads")?;
        ensure!(v.len() == 1 && v[0] >= 1.0 && v[0].fract() == 0.0, "{name}: UNETR num_heads {v:?}");
        num_heads = Some(v[0] as u32);
        notes.push(format!("UNETR num_heads = {}", v[0]));
    }
    Ok(InferenceConfig { preprocessing: prep, num_heads, notes })
}

/// Class names from `metadata.json`'s `network_data_format.outputs.pred.channel_def`
/// (`{"0": "background", "1": "spleen", ...}`), if it has one.
fn class_names(path: &Path) -> Result<Option<Vec<String>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let Some(def) = v.pointer("/network_data_format/outputs/pred/channel_def") else {
        return Ok(None);
    };
    let obj = def.as_object().with_context(|| format!("{}: channel_def is not a map", path.display()))?;
    crate::io::import::numbered_names(obj, &path.display().to_string()).map(Some)
}

/// `_target_` without its module path: `monai.transforms.Spacingd` -> `Spacingd`.
fn target_name(c: &serde_json::Map<String, Value>) -> Option<&str> {
    c.get("_target_")?.as_str().map(|t| t.rsplit('.').next().unwrap_or(t))
}

/// Every component (object with `_target_`) in the document tree (at most 64 levels deep).
fn collect_components<'a>(
    v: &'a Value,
    r: &Resolver<'a>,
    depth: usize,
    out: &mut Vec<&'a serde_json::Map<String, Value>>,
) -> Result<()> {
    ensure!(depth < 64, "{}: references nest more than 64 deep (a cycle?)", r.name);
    match v {
        Value::Object(m) => {
            if m.contains_key("_target_") {
                out.push(m);
            }
            for x in m.values() {
                collect_components(x, r, depth + 1, out)?;
            }
        }
        Value::Array(a) => {
            for x in a {
                collect_components(x, r, depth + 1, out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Resolves `@` references against the document's top level.
struct Resolver<'a> {
    root: &'a Value,
    name: &'a str,
}

impl<'a> Resolver<'a> {
    /// `v` with `@` references followed (to a value that is not a reference).
    fn resolve(&self, v: &'a Value) -> Result<&'a Value> {
        let mut v = v;
        for _ in 0..64 {
            let Some(s) = v.as_str() else { return Ok(v) };
            let Some(path) = s.strip_prefix('@') else { return Ok(v) };
            v = self.lookup(path)?;
        }
        bail!("{}: references nest more than 64 deep (a cycle?)", self.name)
    }

    /// The entry at `a::b::0` (or `a#b#0`).
    fn lookup(&self, path: &str) -> Result<&'a Value> {
        let mut v = self.root;
        let parts: Vec<&str> =
            if path.contains("::") { path.split("::").collect() } else { path.split('#').collect() };
        for p in parts {
            v = match v {
                Value::Object(m) => m.get(p),
                Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            }
            .with_context(|| format!("{}: reference @{path} points at nothing", self.name))?;
        }
        Ok(v)
    }

    /// A number or a list of numbers at `key` of component `what`; `flag` names the override.
    fn numbers(
        &self,
        c: &'a serde_json::Map<String, Value>,
        key: &str,
        what: &str,
        flag: &str,
    ) -> Result<Vec<f64>> {
        let raw = c.get(key).with_context(|| format!("{}: {what} has no {key}; give {flag}", self.name))?;
        let v = self.resolve(raw)?;
        let number = |x: &'a Value| -> Result<f64> {
            let x = self.resolve(x)?;
            if let Some(s) = x.as_str().filter(|s| s.starts_with('$')) {
                bail!("{}: {what} {key} is a Python expression ({s:?}); give {flag}", self.name);
            }
            x.as_f64()
                .with_context(|| format!("{}: {what} {key} = {x} is not a number; give {flag}", self.name))
        };
        match v {
            Value::Array(a) => a.iter().map(number).collect(),
            x => Ok(vec![number(x)?]),
        }
    }

    /// A string at `key` of component `what`.
    fn string(&self, c: &'a serde_json::Map<String, Value>, key: &str, what: &str) -> Result<String> {
        let raw = c.get(key).with_context(|| format!("{}: {what} has no {key}", self.name))?;
        let v = self.resolve(raw)?;
        let s = v.as_str().with_context(|| format!("{}: {what} {key} = {v} is not a string", self.name))?;
        ensure!(!s.starts_with('$'), "{}: {what} {key} is a Python expression ({s:?})", self.name);
        Ok(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A config in the model zoo's style: values shared through `@` references (both separators),
    /// module-qualified targets, transforms inside a Compose; every value lands in the choices.
    #[test]
    fn inference_config_values_are_read_through_references() {
        let config = json!({
            "imports": ["$import glob"],
            "pixdim": [1.5, 1.5, 2.0],
            "window": {"lo": -175, "hi": 250},
            "roi": [96, 96, 96],
            "device": "$torch.device('cpu')",
            "network_def": {"_target_": "UNETR", "in_channels": 1, "out_channels": 14,
                            "img_size": "@roi", "num_heads": 6, "feature_size": 16},
            "network": "$@network_def.to(@device)",
            "preprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "monai.transforms.Orientationd", "keys": "image", "axcodes": "LPS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim", "mode": "bilinear"},
                {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": "@window::lo",
                 "a_max": "@window#hi", "b_min": 0.0, "b_max": 1.0, "clip": true},
                {"_target_": "CropForegroundd", "keys": "image", "source_key": "image"}
            ]},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi", "sw_batch_size": 4,
                        "overlap": 0.5}
        });
        let b = from_config(&config, "inference.json").unwrap();
        let p = &b.preprocessing;
        assert_eq!(p.orientation.as_deref(), Some("LPS"));
        assert_eq!(p.spacing, Some([1.5, 1.5, 2.0]));
        assert_eq!(p.intensity, Some([-175.0, 250.0, 0.0, 1.0]));
        assert_eq!(p.clip, Some(true));
        assert_eq!(p.crop, Some(true));
        assert_eq!(p.roi, Some(96));
        assert_eq!(b.num_heads, Some(6));
    }

    /// MONAI's defaults where the config is silent: no clip, no crop without CropForegroundd.
    #[test]
    fn absent_settings_take_monais_defaults() {
        let config = json!({"preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
             "b_min": 0, "b_max": 1}]}});
        let p = from_config(&config, "c.json").unwrap().preprocessing;
        assert_eq!(p.clip, Some(false));
        assert_eq!(p.crop, Some(false));
        assert_eq!(p.spacing, None);
    }

    /// Values we cannot read are errors naming the setting and the flag that replaces it.
    #[test]
    fn unreadable_values_name_the_setting() {
        let expr = json!({"t": [{"_target_": "Spacingd", "pixdim": "$[1.5] * 3"}]});
        let e = format!("{:#}", from_config(&expr, "inference.json").unwrap_err());
        assert!(e.contains("Spacingd pixdim") && e.contains("--spacing"), "{e}");
        let dangling = json!({"t": [{"_target_": "Spacingd", "pixdim": "@nowhere"}]});
        let e = format!("{:#}", from_config(&dangling, "inference.json").unwrap_err());
        assert!(e.contains("@nowhere"), "{e}");
        let cycle = json!({"a": "@b", "b": "@a", "t": [{"_target_": "Spacingd", "pixdim": "@a"}]});
        assert!(from_config(&cycle, "inference.json").is_err());
        let not_cubic = json!({"i": {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 64]}});
        let e = format!("{:#}", from_config(&not_cubic, "inference.json").unwrap_err());
        assert!(e.contains("cubic"), "{e}");
        let swin = json!({"network_def": {"_target_": "SwinUNETR"}});
        let e = format!("{:#}", from_config(&swin, "inference.json").unwrap_err());
        assert!(e.contains("only UNETR"), "{e}");
    }
}
