//! A pretraining run on disk: the saved configuration, per-step metrics, and checkpoints that are
//! written atomically and resume exactly.
//!
//! `RUN_DIR/config.json` holds the full configuration; `RUN_DIR/metrics.csv` one row per step;
//! `RUN_DIR/checkpoint.bin` the student, teacher, optimizer state, teacher centre and step.
//! Samples for step `s` are drawn with `Rng::for_item(seed, s)`, so a resumed run sees the same
//! views and masks it would have seen without stopping.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device, Tensor, TensorData};
use glmae_data::io::atomic_write;

use crate::pretrain::{PretrainConfig, Pretrainer, StepMetrics};

/// Checkpoints end with the CRC-32 of everything before it, so a flipped bit is an error rather
/// than a run that resumes with other losses. `GLMAECK1` files (no checksum) still load.
const CHECKPOINT_MAGIC: &[u8; 8] = b"GLMAECK2";
const CHECKPOINT_MAGIC_V1: &[u8; 8] = b"GLMAECK1";
/// Columns of `metrics.csv`.
/// `h_cond`, `h_marg` and `mi` are the collapse watch (nats; 0 without consistency), `tau_t` the
/// teacher temperature.
pub const METRICS_HEADER: &str =
    "step,loss,rec_global,rec_local,consistency,lr,momentum,grad_norm,views_per_s,h_cond,h_marg,mi,tau_t";

/// Paths inside a run folder.
#[derive(Clone, Debug)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// A run folder (created when missing).
    pub fn create(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create run folder {}", root.display()))?;
        Ok(Self { root: root.to_path_buf() })
    }

    /// An existing run folder.
    pub fn open(root: &Path) -> Result<Self> {
        ensure!(
            root.join("config.json").is_file(),
            "{} is not a run folder (no config.json)",
            root.display()
        );
        Ok(Self { root: root.to_path_buf() })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `config.json`.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.json")
    }

    /// `checkpoint.bin`.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.root.join("checkpoint.bin")
    }

    /// `metrics.csv`.
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.csv")
    }

    /// Saves the configuration.
    pub fn save_config(&self, cfg: &PretrainConfig) -> Result<()> {
        atomic_write(&self.config_path(), serde_json::to_string_pretty(cfg)?.as_bytes())
    }

    /// Reads the configuration.
    pub fn load_config(&self) -> Result<PretrainConfig> {
        let p = self.config_path();
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a pretraining configuration", p.display()))
    }

    /// Appends one metrics row (writing the header first for a new file).
    pub fn append_metrics(&self, m: &StepMetrics, views_per_s: f64) -> Result<()> {
        let p = self.metrics_path();
        let new = !p.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .with_context(|| format!("cannot write {}", p.display()))?;
        if new {
            writeln!(f, "{METRICS_HEADER}")?;
        }
        writeln!(
            f,
            "{},{:.6},{:.6},{:.6},{:.6},{:.6e},{:.6},{:.4},{:.3},{:.5},{:.5},{:.5},{:.4}",
            m.step,
            m.loss,
            m.rec_global,
            m.rec_local,
            m.consistency,
            m.lr,
            m.momentum,
            m.grad_norm,
            views_per_s,
            m.collapse.h_cond,
            m.collapse.h_marg,
            m.collapse.mi,
            m.tau_teacher,
        )
        .with_context(|| format!("cannot write {}", p.display()))
    }

    /// `loss.png`.
    pub fn plot_path(&self) -> PathBuf {
        self.root.join("loss.png")
    }

    /// Draws the loss columns of `metrics.csv` into `loss.png`, with a second panel for the
    /// collapse watch (H_cond, H_marg, MI) when the run has a consistency term.
    pub fn plot_losses(&self) -> Result<()> {
        let p = self.metrics_path();
        let table = crate::plot::read_csv(&p)?;
        let pick = |names: &[&'static str]| -> Vec<(&'static str, Vec<f64>)> {
            names
                .iter()
                .filter_map(|n| table.column(n).map(|v| (*n, v)))
                .filter(|(_, v)| v.iter().any(|x| *x != 0.0))
                .collect()
        };
        let reconstruction = pick(&["rec_global", "rec_local"]);
        let total = pick(&["loss", "consistency"]);
        let watch = pick(&["h_cond", "h_marg", "mi"]);
        // The consistency term is two orders of magnitude above the masked-patch MSE: each gets
        // its own panel so both stay readable.
        let mut panels = vec![crate::plot::Panel {
            title: "GL-MAE PRETRAINING: MASKED-PATCH MSE",
            y_label: "MSE",
            series: reconstruction,
        }];
        if total.iter().any(|(n, _)| *n == "consistency") {
            panels.push(crate::plot::Panel {
                title: "TOTAL LOSS AND CONSISTENCY",
                y_label: "LOSS",
                series: total,
            });
        }
        if !watch.is_empty() {
            panels.push(crate::plot::Panel {
                title: "COLLAPSE WATCH: TEACHER ENTROPIES",
                y_label: "NATS",
                series: watch,
            });
        }
        crate::plot::panels_chart(&self.plot_path(), &table.x("step"), &panels)
    }

    /// Keeps only the metrics rows of steps before `step` (after resuming from a checkpoint
    /// older than the last logged step).
    pub fn truncate_metrics(&self, step: usize) -> Result<()> {
        let p = self.metrics_path();
        let Ok(text) = std::fs::read_to_string(&p) else { return Ok(()) };
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| l.split(',').next().and_then(|s| s.parse::<usize>().ok()).is_none_or(|s| s < step))
            .collect();
        atomic_write(&p, (kept.join("\n") + "\n").as_bytes())
    }

    /// Writes a checkpoint atomically.
    pub fn save_checkpoint(&self, run: &Pretrainer) -> Result<()> {
        let mut out = Vec::new();
        out.extend_from_slice(CHECKPOINT_MAGIC);
        // The centre is in the run's float type (bf16 on a bf16 device); the header keeps f32.
        let center: Vec<f32> = run
            .center
            .to_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let header = serde_json::to_vec(&serde_json::json!({ "step": run.step, "center": center }))?;
        let student = run.student.clone().into_record().into_bytes().map_err(|e| anyhow::anyhow!("{e}"))?;
        let teacher = run.teacher.clone().into_record().into_bytes().map_err(|e| anyhow::anyhow!("{e}"))?;
        let optimizer = run.optimizer.into_bytes().map_err(|e| anyhow::anyhow!("{e}"))?;
        for blob in [&header[..], &student[..], &teacher[..], &optimizer[..]] {
            out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
            out.extend_from_slice(blob);
        }
        let crc = glmae_core::format::crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        atomic_write(&self.checkpoint_path(), &out)
    }

    /// Restores a run from its configuration and checkpoint onto `device`.
    pub fn resume(&self, device: Device) -> Result<Pretrainer> {
        self.load(device, true)
    }

    /// The run's student, teacher and centre without its optimizer state: what fine-tuning
    /// starts from (burn restores optimizer state on its default device, which may be a GPU).
    pub fn load_weights(&self, device: Device) -> Result<Pretrainer> {
        self.load(device, false)
    }

    fn load(&self, device: Device, with_optimizer: bool) -> Result<Pretrainer> {
        let cfg = self.load_config()?;
        let p = self.checkpoint_path();
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read checkpoint {}", p.display()))?;
        let name = p.display();
        let bytes = if bytes.starts_with(CHECKPOINT_MAGIC) {
            ensure!(bytes.len() >= 12, "{name}: checkpoint is truncated");
            let (body, tail) = bytes.split_at(bytes.len() - 4);
            let stored = u32::from_le_bytes(tail.try_into()?);
            ensure!(
                glmae_core::format::crc32(body) == stored,
                "{name}: checkpoint is damaged (checksum mismatch); resume from a copy or start again"
            );
            body
        } else {
            ensure!(bytes.starts_with(CHECKPOINT_MAGIC_V1), "{name}: not a glmae checkpoint");
            &bytes[..]
        };
        let mut blobs = Vec::new();
        let mut at = 8;
        for _ in 0..4 {
            ensure!(bytes.len() >= at + 8, "{name}: checkpoint is truncated");
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into()?) as usize;
            at += 8;
            ensure!(bytes.len() >= at + len, "{name}: checkpoint is truncated");
            blobs.push(&bytes[at..at + len]);
            at += len;
        }
        if at != bytes.len() {
            bail!("{name}: unexpected bytes after the checkpoint");
        }
        let header: serde_json::Value =
            serde_json::from_slice(blobs[0]).with_context(|| format!("{name}: bad header"))?;
        let step = header["step"].as_u64().with_context(|| format!("{name}: no step"))? as usize;
        let center: Vec<f32> = serde_json::from_value(header["center"].clone())?;
        let mut run = Pretrainer::new(cfg.clone(), device.clone());
        ensure!(
            center.len() == cfg.head.out,
            "{name}: centre has {} values, the head {}",
            center.len(),
            cfg.head.out
        );
        let record = |b: &[u8]| {
            ModuleRecord::from_bytes(Bytes::from_bytes_vec(b.to_vec()))
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))
        };
        run.student = run.student.load_record(record(blobs[1])?);
        run.teacher = run.teacher.load_record(record(blobs[2])?).no_grad();
        if with_optimizer {
            run.optimizer = run
                .optimizer
                .from_bytes(Bytes::from_bytes_vec(blobs[3].to_vec()))
                .map_err(|e| anyhow::anyhow!("{name}: optimizer state: {e}"))?;
        }
        run.center = Tensor::from_data(TensorData::new(center, [cfg.head.out]), &device);
        run.step = step;
        Ok(run)
    }
}
