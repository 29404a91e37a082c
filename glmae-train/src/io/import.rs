//! Importing MONAI UNETR state dicts (and the GL-MAE authors' checkpoints, whose keys carry a
//! `module.backbone.` prefix) into glmae-core's format.
//!
//! Reads safetensors and PyTorch checkpoints (`torch.save`, `.pt`/`.pth`, zip or pre-1.6
//! container). A checkpoint may be the state dict itself or a dictionary holding it under
//! `student` (the GL-MAE authors' DINO-style checkpoints), `state_dict` or `model` (MONAI and
//! Lightning trainers); the other entries (teacher, optimizer, epoch, arguments) are ignored.
//! The pickle is read by burn's `pytorch-reader`, which interprets only the opcodes and classes
//! `torch.save` writes and never runs code from the file.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use glmae_core::config::MAX_DEPTH;
use glmae_core::params::{UnetrParams, for_each_param};
use glmae_core::{PosEmbed, UnetrConfig, VitConfig};
use safetensors::{Dtype, SafeTensors};

use crate::nets::naming::NamedTensor;

/// What the weights cannot tell: MONAI's defaults are 12 heads and LayerNorm eps 1e-5.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportOptions {
    /// Attention heads.
    pub num_heads: u32,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f32,
}

impl Default for ImportOptions {
    fn default() -> Self {
        Self { num_heads: 12, layer_norm_eps: 1e-5 }
    }
}

/// The preprocessing a state dict does not carry, stored in the imported model: each `None`
/// keeps the BTCV default (RAS, 1.5 x 1.5 x 2 mm, HU [-175, 250] -> [0, 1] clipped, foreground
/// crop, BTCV's 14 class names or `class N`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ImportPreprocessing {
    /// Axis codes the volume is reoriented to (MONAI's `Orientationd` `axcodes`).
    pub orientation: Option<String>,
    /// Target spacing in mm (MONAI's `Spacingd` `pixdim`).
    pub spacing: Option<[f32; 3]>,
    /// `ScaleIntensityRanged`'s `a_min, a_max, b_min, b_max`.
    pub intensity: Option<[f32; 4]>,
    /// `ScaleIntensityRanged`'s `clip`.
    pub clip: Option<bool>,
    /// Cubic ROI edge in voxels (the sliding window); with a learned position table it must be
    /// the table's grid times the patch.
    pub roi: Option<u32>,
    /// Crop to the foreground before inference (`CropForegroundd`).
    pub crop: Option<bool>,
    /// Class names, background first (one per output channel).
    pub classes: Option<Vec<String>>,
}

impl ImportPreprocessing {
    /// Applies the choices to the imported `cfg` (its window) and returns the preprocessing to
    /// store; every value is checked and an error says which flag is wrong.
    pub fn apply(&self, cfg: &mut UnetrConfig) -> Result<glmae_core::format::OwnedPreprocessing> {
        let mut prep = glmae_core::format::OwnedPreprocessing::for_classes(cfg.out_channels as usize);
        if let Some(codes) = &self.orientation {
            ensure!(
                glmae_core::preprocessing::valid_orientation(codes),
                "orientation {codes:?}: expected three axis codes such as RAS or LPS"
            );
            prep.orientation = codes.clone();
        }
        if let Some(s) = self.spacing {
            ensure!(
                s.iter().all(|v| v.is_finite() && (0.01..=100.0).contains(v)),
                "--spacing {s:?}: each value must be a voxel size between 0.01 and 100 mm"
            );
            prep.target_spacing = s;
        }
        if let Some([a_min, a_max, b_min, b_max]) = self.intensity {
            ensure!(
                [a_min, a_max, b_min, b_max].iter().all(|v| v.is_finite()) && a_min < a_max && b_min < b_max,
                "--intensity {a_min},{a_max},{b_min},{b_max}: needs a_min < a_max and b_min < b_max"
            );
            prep.intensity =
                glmae_core::IntensityScaling { a_min, a_max, b_min, b_max, clip: prep.intensity.clip };
        }
        if let Some(clip) = self.clip {
            prep.intensity.clip = clip;
        }
        if let Some(crop) = self.crop {
            prep.foreground_crop = crop;
        }
        if let Some(names) = &self.classes {
            ensure!(
                names.len() == cfg.out_channels as usize,
                "--classes lists {} names, the model has {} output channels (background first)",
                names.len(),
                cfg.out_channels
            );
            prep.class_names = names.clone();
        }
        if let Some(roi) = self.roi {
            let patch = cfg.vit.patch_size;
            ensure!(
                roi > 0 && roi.is_multiple_of(patch),
                "--roi {roi} must be a multiple of the patch size {patch}"
            );
            ensure!(
                cfg.vit.pos_embed == PosEmbed::SinCos || cfg.vit.img_size == [roi; 3],
                "--roi {roi}: the model's learned position table fixes its window at {:?}",
                cfg.vit.img_size
            );
            cfg.vit.img_size = [roi; 3];
        }
        cfg.validate()?;
        Ok(prep)
    }
}

/// Class names from a file: a JSON list, an MSD `labels` map (`{"0": "background", ...}`, alone
/// or inside a `dataset.json`), or one name per line.
pub fn read_class_names(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let name = path.display();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        let map = v.get("labels").unwrap_or(&v);
        if let Some(list) = map.as_array() {
            return list
                .iter()
                .map(|x| x.as_str().map(str::to_string).with_context(|| format!("{name}: {x} is not a name")))
                .collect();
        }
        let obj = map.as_object().with_context(|| format!("{name}: expected a list or a labels map"))?;
        return numbered_names(obj, &name.to_string());
    }
    let names: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
    ensure!(!names.is_empty(), "{name}: no class names");
    Ok(names)
}

/// Names from a map numbered from 0 without gaps (`{"0": "background", "1": "spleen", ...}`: an
/// MSD `labels` map, a MONAI bundle's `channel_def`), in order; `name` labels errors.
pub(crate) fn numbered_names(
    obj: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Vec<String>> {
    let mut pairs: Vec<(usize, String)> = obj
        .iter()
        .map(|(k, v)| {
            let i = k.parse::<usize>().with_context(|| format!("{name}: label {k:?} is not a number"))?;
            let s = v.as_str().with_context(|| format!("{name}: label {k} has no name"))?;
            Ok((i, s.to_string()))
        })
        .collect::<Result<_>>()?;
    pairs.sort();
    ensure!(
        pairs.iter().enumerate().all(|(i, (k, _))| i == *k),
        "{name}: labels must be numbered 0, 1, 2, ... without gaps"
    );
    Ok(pairs.into_iter().map(|(_, s)| s).collect())
}

/// Prefixes wrappers add: DataParallel (`module.`), the GL-MAE authors' `module.backbone.`.
const PREFIXES: [&str; 3] = ["module.backbone.", "module.", "backbone."];

fn canonical(name: &str) -> &str {
    PREFIXES.iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name)
}

/// MONAI parameters our UNETR does not have: the cross-attention block MONAI builds in every
/// transformer block even when it is disabled.
fn ignored(name: &str) -> bool {
    name.contains(".cross_attn.") || name.contains(".norm_cross_attn.")
}

/// Dictionary keys a checkpoint may keep its state dict under, in the order they are tried:
/// a DINO-style checkpoint has both `student` and `teacher`, and the student is the model.
pub const STATE_DICT_KEYS: [&str; 3] = ["student", "state_dict", "model"];

/// A `.glmae` file of imported tensors (`import_unetr`'s output) with `preprocessing`: what
/// `glmae-train import` writes.
pub fn model_bytes(
    cfg: UnetrConfig,
    preprocessing: glmae_core::format::OwnedPreprocessing,
    precision: glmae_core::format::Precision,
    tensors: &[NamedTensor],
) -> Result<Vec<u8>> {
    let builder = glmae_core::format::ModelBuilder::from_params(cfg, preprocessing, precision, |p| {
        tensors.iter().find(|t| t.name == p.name.as_str()).map(|t| t.values.as_slice())
    })?;
    Ok(builder.to_bytes()?)
}

/// Reads every float tensor (f32, f16, bf16 or f64) of a safetensors file or a PyTorch
/// checkpoint under its canonical name. Integer tensors (counters, indices) are skipped.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, NamedTensor>> {
    // A safetensors file starts with its header length (u64, little-endian) and a JSON header;
    // anything else is handed to the PyTorch reader, which knows zip, legacy and tar containers.
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    let safetensors = std::io::Read::read_exact(&mut file, &mut head).is_ok()
        && head[8] == b'{'
        && u64::from_le_bytes([head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7]])
            .checked_add(8)
            .is_some_and(|end| end <= len);
    if safetensors { read_safetensors(path) } else { read_pytorch(path) }
}

fn read_safetensors(path: &Path) -> Result<BTreeMap<String, NamedTensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: damaged safetensors file", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let format = match view.dtype() {
            Dtype::F32 => Float::F32,
            Dtype::F64 => Float::F64,
            Dtype::F16 => Float::F16,
            Dtype::BF16 => Float::BF16,
            _ => continue, // integer buffers (e.g. batch counters) are not weights
        };
        let canon = canonical(&name).to_string();
        let values = format.decode(view.data());
        out.insert(canon.clone(), NamedTensor { name: canon, shape: view.shape().to_vec(), values });
    }
    Ok(out)
}

fn read_pytorch(path: &Path) -> Result<BTreeMap<String, NamedTensor>> {
    use pytorch_reader::DType;
    let name = path.display();
    let reader = pytorch_reader::PytorchReader::new(path)
        .map_err(|e| anyhow::anyhow!("{name}: neither safetensors nor a readable PyTorch checkpoint: {e}"))?;
    // The reader names each tensor by its dotted path through nested dictionaries.
    let tensors = reader.into_tensors();
    let wrapper = STATE_DICT_KEYS
        .into_iter()
        .map(|k| format!("{k}."))
        .find(|k| tensors.keys().any(|n| n.starts_with(k.as_str())));
    let mut out = BTreeMap::new();
    for (full, t) in tensors {
        let key = match &wrapper {
            Some(w) => match full.strip_prefix(w.as_str()) {
                Some(k) => k,
                None => continue, // teacher, optimizer state and the like
            },
            None => full.as_str(),
        };
        let format = match t.dtype() {
            DType::F32 => Float::F32,
            DType::F64 => Float::F64,
            DType::F16 => Float::F16,
            DType::BF16 => Float::BF16,
            _ => continue,
        };
        let bytes = t.read().map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let canon = canonical(key).to_string();
        let values = format.decode(&bytes);
        out.insert(canon.clone(), NamedTensor { name: canon, shape: t.shape().to_vec(), values });
    }
    ensure!(
        !out.is_empty(),
        "{name}: the checkpoint holds no floating-point tensors{}",
        wrapper.map_or(String::new(), |w| format!(" under `{}`", w.trim_end_matches('.')))
    );
    Ok(out)
}

/// Floating-point element types. Bytes are little-endian: safetensors by definition, and
/// pytorch-reader hands back native-endian bytes (it refuses big-endian files) on the
/// little-endian hosts this runs on.
#[derive(Clone, Copy)]
enum Float {
    F32,
    F64,
    F16,
    BF16,
}

impl Float {
    fn decode(self, data: &[u8]) -> Vec<f32> {
        match self {
            Float::F32 => {
                data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            Float::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or_default()) as f32)
                .collect(),
            Float::F16 => {
                data.chunks_exact(2).map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]]), false)).collect()
            }
            Float::BF16 => {
                data.chunks_exact(2).map(|b| half_to_f32(u16::from_le_bytes([b[0], b[1]]), true)).collect()
            }
        }
    }
}

fn half_to_f32(h: u16, bf16: bool) -> f32 {
    if bf16 {
        return f32::from_bits((h as u32) << 16);
    }
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if frac == 0 => sign,
        // Subnormal half: frac x 2^-24, exact in f32.
        0 => {
            let magnitude = frac as f32 * 2f32.powi(-24);
            return if sign != 0 { -magnitude } else { magnitude };
        }
        31 => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | (((exp - 15 + 127) as u32) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

fn dims(t: &BTreeMap<String, NamedTensor>, name: &str) -> Result<Vec<usize>> {
    t.get(name)
        .map(|x| x.shape.clone())
        .with_context(|| format!("missing `{name}`, which fixes the architecture"))
}

/// The UNETR configuration a MONAI state dict implies, and its tensors under our names. Every
/// missing, unexpected or misshapen tensor is listed in one error.
pub fn import_unetr(path: &Path, opts: &ImportOptions) -> Result<(UnetrConfig, Vec<NamedTensor>)> {
    let mut t = read_tensors(path)?;
    t.retain(|k, _| !ignored(k));
    let name = path.display();
    // The names come from glmae-core's parameter tree for a probe configuration that has every
    // optional tensor (qkv bias, learned positions) and the most blocks; only names are read.
    let probe = UnetrParams::specs(&UnetrConfig {
        vit: VitConfig {
            depth: MAX_DEPTH as u32,
            qkv_bias: true,
            pos_embed: PosEmbed::Learned,
            ..VitConfig::vit_t([96; 3])
        },
        feature_size: 16,
        out_channels: 2,
    });
    let first = probe.vit.blocks.first().context("the probe configuration has blocks")?;
    let pe = dims(&t, &probe.vit.patch_embedding.patch_embeddings.weight.name)
        .with_context(|| format!("{name}"))?;
    ensure!(
        pe.len() == 5,
        "{name}: patch embedding weight has shape {pe:?}, expected (hidden, channels, p, p, p)"
    );
    let (hidden, in_channels, patch) = (pe[0] as u32, pe[1] as u32, pe[2] as u32);
    let mlp = dims(&t, &first.mlp.linear1.weight.name).with_context(|| format!("{name}"))?[0] as u32;
    let depth =
        probe.vit.blocks.iter().take_while(|b| t.contains_key(b.norm1.weight.name.as_str())).count() as u32;
    let feature = dims(&t, &probe.encoder1.conv1.name).with_context(|| format!("{name}"))?[0] as u32;
    let classes = dims(&t, &probe.out.weight.name).with_context(|| format!("{name}"))?[0] as u32;
    let qkv_bias = first.attn.qkv_bias.as_ref().is_some_and(|b| t.contains_key(b.name.as_str()));
    let position_name =
        probe.vit.patch_embedding.position_embeddings.as_ref().map(|p| p.name.as_str()).unwrap_or_default();
    let mut vit = VitConfig {
        in_channels,
        img_size: [96; 3],
        patch_size: patch,
        hidden_size: hidden,
        depth,
        num_heads: opts.num_heads,
        mlp_dim: mlp,
        qkv_bias,
        layer_norm_eps: opts.layer_norm_eps,
        pos_embed: PosEmbed::Learned,
    };
    // MONAI stores the position table even when it is sin-cos; a cubic grid is assumed for the
    // window (MONAI's ROIs are cubic), and a table equal to our sin-cos one is dropped.
    if let Some(pos) = t.get(position_name) {
        let n = pos.shape.get(1).copied().unwrap_or(0);
        let g = (n as f64).cbrt().round() as usize;
        ensure!(g * g * g == n, "{name}: {n} position embeddings do not form a cubic token grid");
        vit.img_size = [g as u32 * patch; 3];
        let sincos = crate::pretrain::views::sincos_table([g; 3], hidden as usize);
        if hidden % 6 == 0 && sincos.iter().zip(&pos.values).all(|(a, b)| (a - b).abs() < 1e-4) {
            vit.pos_embed = PosEmbed::SinCos;
            t.remove(position_name);
        }
    } else {
        vit.pos_embed = PosEmbed::SinCos;
    }
    let cfg = UnetrConfig { vit, feature_size: feature, out_channels: classes };
    cfg.validate().with_context(|| format!("{name}: the weights imply an invalid UNETR"))?;

    let mut problems = Vec::new();
    let mut out = Vec::new();
    for_each_param(&cfg, |p| match t.remove(p.name.as_str()) {
        Some(x) => {
            let want: Vec<usize> = p.shape.dims().iter().map(|&d| d as usize).collect();
            if x.shape == want {
                out.push(x);
            } else {
                problems.push(format!("`{}` has shape {:?}, expected {want:?}", p.name, x.shape));
            }
        }
        None => problems.push(format!("missing `{}` {:?}", p.name, p.shape.dims())),
    });
    for (k, v) in &t {
        problems.push(format!("unexpected `{k}` {:?}", v.shape));
    }
    if !problems.is_empty() {
        bail!("{name}: not a MONAI UNETR state dict for {cfg:?}:\n  {}", problems.join("\n  "));
    }
    Ok((cfg, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No choice keeps the BTCV defaults; each flag lands in the stored preprocessing; `--roi`
    /// sets a sin-cos model's window and is refused where a learned table fixes it; bad values
    /// are refused naming the flag.
    #[test]
    fn import_preprocessing_applies_and_checks_each_choice() {
        let mut cfg = glmae_core::testing_config();
        let prep = ImportPreprocessing::default().apply(&mut cfg).unwrap();
        assert_eq!(prep, glmae_core::format::OwnedPreprocessing::for_classes(3));
        assert_eq!(cfg, glmae_core::testing_config());

        let names: Vec<String> = ["background", "liver", "tumour"].map(String::from).to_vec();
        let choices = ImportPreprocessing {
            orientation: Some("LPS".into()),
            spacing: Some([0.8, 0.8, 3.0]),
            intensity: Some([-57.0, 164.0, 0.0, 1.0]),
            clip: Some(false),
            roi: Some(64),
            crop: Some(false),
            classes: Some(names.clone()),
        };
        let prep = choices.apply(&mut cfg).unwrap();
        assert_eq!(prep.orientation, "LPS");
        assert_eq!(prep.target_spacing, [0.8, 0.8, 3.0]);
        assert_eq!((prep.intensity.a_min, prep.intensity.a_max, prep.intensity.clip), (-57.0, 164.0, false));
        assert!(!prep.foreground_crop);
        assert_eq!(prep.class_names, names);
        assert_eq!(cfg.vit.img_size, [64; 3]);

        let err = |c: ImportPreprocessing, cfg: &mut UnetrConfig| c.apply(cfg).unwrap_err().to_string();
        let mut learned = glmae_core::testing_config();
        learned.vit.pos_embed = PosEmbed::Learned;
        let e = err(ImportPreprocessing { roi: Some(64), ..Default::default() }, &mut learned);
        assert!(e.contains("learned position table"), "{e}");
        let e = err(
            ImportPreprocessing { roi: Some(40), ..Default::default() },
            &mut glmae_core::testing_config(),
        );
        assert!(e.contains("multiple of the patch"), "{e}");
        let e = err(
            ImportPreprocessing { intensity: Some([0.0, 1.0, 1.0, 0.0]), ..Default::default() },
            &mut glmae_core::testing_config(),
        );
        assert!(e.contains("--intensity"), "{e}");
        let e = err(
            ImportPreprocessing { spacing: Some([1.0, 0.0, 1.0]), ..Default::default() },
            &mut glmae_core::testing_config(),
        );
        assert!(e.contains("--spacing"), "{e}");
        let e = err(
            ImportPreprocessing { orientation: Some("RAX".into()), ..Default::default() },
            &mut glmae_core::testing_config(),
        );
        assert!(e.contains("orientation \"RAX\""), "{e}");
        let e = err(
            ImportPreprocessing { classes: Some(vec!["background".into()]), ..Default::default() },
            &mut glmae_core::testing_config(),
        );
        assert!(e.contains("3 output channels"), "{e}");
    }

    /// Class names read the same from a JSON list, an MSD labels map (alone or in a
    /// dataset.json) and a plain list; a gap in the numbering is refused.
    #[test]
    fn class_names_read_from_each_format() {
        let dir = std::env::temp_dir().join(format!("glmae-classes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let want = vec!["background".to_string(), "spleen".to_string(), "right kidney".to_string()];
        for (file, text) in [
            ("list.json", r#"["background", "spleen", "right kidney"]"#),
            ("map.json", r#"{"2": "right kidney", "0": "background", "1": "spleen"}"#),
            (
                "dataset.json",
                r#"{"name": "x", "labels": {"0": "background", "1": "spleen", "2": "right kidney"}}"#,
            ),
            ("names.txt", "background\nspleen\n  right kidney  \n\n"),
        ] {
            std::fs::write(dir.join(file), text).unwrap();
            assert_eq!(read_class_names(&dir.join(file)).unwrap(), want, "{file}");
        }
        std::fs::write(dir.join("gap.json"), r#"{"0": "background", "2": "liver"}"#).unwrap();
        let e = read_class_names(&dir.join("gap.json")).unwrap_err().to_string();
        assert!(e.contains("without gaps") && e.contains("gap.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn half_precision_decodes() {
        assert_eq!(half_to_f32(0x3c00, false), 1.0);
        assert_eq!(half_to_f32(0xc000, false), -2.0);
        assert_eq!(half_to_f32(0x0001, false), 2f32.powi(-24));
        assert_eq!(half_to_f32(0x83ff, false), -1023.0 * 2f32.powi(-24));
        assert_eq!(half_to_f32(0x3f80, true), 1.0);
        assert!(half_to_f32(0x7e00, false).is_nan());
    }

    #[test]
    fn prefixes_and_cross_attention_are_handled() {
        assert_eq!(canonical("module.backbone.vit.norm.weight"), "vit.norm.weight");
        assert_eq!(canonical("module.out.conv.conv.bias"), "out.conv.conv.bias");
        assert!(ignored("vit.blocks.3.norm_cross_attn.weight"));
        assert!(!ignored("vit.blocks.3.attn.qkv.weight"));
    }
}
