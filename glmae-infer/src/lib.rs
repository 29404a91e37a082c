//! # glmae-infer
//!
//! CPU inference from `.glmae` weight files: loading a model with errors that name the file,
//! describing it (`glmae-infer info`), and segmenting NIfTI volumes (`glmae-infer segment`) with
//! exactly the preprocessing stored in the model, labels written on the input's own grid.
//!
//! Windows run on this crate's own forward pass ([`fast`]: packed GEMM micro-kernels with AVX2 +
//! FMA, implicit-GEMM convolutions, every core working inside each window), which is checked
//! against glmae-core's reference kernels; [`Engine::Reference`] runs those instead (one window
//! per thread), for comparison.

pub mod fast;
pub mod serve;

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use glmae_core::params::weight_count;
use glmae_core::{ModelFile, PosEmbed, Unetr};

/// Reads a weight file; the error names the file.
pub fn read_model_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read model file {name}"))?;
    // A device such as /dev/zero would be read until memory runs out.
    anyhow::ensure!(meta.is_file(), "model file {name} is not a regular file (a device, pipe or folder)");
    anyhow::ensure!(
        meta.len() <= MAX_MODEL_BYTES,
        "model file {name} is {} bytes, more than the {MAX_MODEL_BYTES} a .glmae file may have",
        meta.len()
    );
    std::fs::read(path).with_context(|| format!("cannot read model file {name}"))
}

/// The largest `.glmae` file read: 2 GiB (a float32 UNETR on ViT-B is about 0.4 GB).
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

/// Parses and checks weight-file bytes; the error names the file and the problem.
pub fn parse_model<'a>(path: &Path, bytes: &'a [u8]) -> Result<ModelFile<'a>> {
    ModelFile::parse(bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// A human-readable summary: architecture, classes, preprocessing, storage and memory needs.
pub fn describe(file: &ModelFile<'_>) -> Result<String> {
    let c = &file.config;
    let v = &c.vit;
    let window = v.img_size.map(|s| s as usize);
    let model = Unetr::new(file)?;
    let scratch = model.segment_scratch_len(window)?;
    let (int8, f32_bytes) = file.storage();
    let p = &file.preprocessing;
    let mut s = String::new();
    writeln!(
        s,
        "model: UNETR, {} parameters in {} tensors, {} bytes on disk",
        weight_count(c),
        file.tensor_count(),
        file.len()
    )?;
    writeln!(s, "  weights: {int8} int8 values, {f32_bytes} bytes of f32")?;
    if model.has_int8() {
        // The file also carries glmae-core's integer pass (the firmware's), which this crate's
        // kernels do not use: their int8 mode keeps 16-bit activations.
        let q = model.int8_scratch_len(window)?;
        writeln!(
            s,
            "  int8 activation scales for glmae-core's integer pass ({} points, {} bytes of scratch per window)",
            glmae_core::model::point_count(c),
            q.bytes()
        )?;
    }
    writeln!(
        s,
        "  encoder: ViT hidden {} depth {} heads {} mlp {} patch {}, qkv bias {}, LayerNorm eps {:e}, position {}",
        v.hidden_size,
        v.depth,
        v.num_heads,
        v.mlp_dim,
        v.patch_size,
        v.qkv_bias,
        v.layer_norm_eps,
        match v.pos_embed {
            PosEmbed::SinCos => "sin-cos (any window that is a multiple of 16)",
            PosEmbed::Learned => "learned (fixed window)",
        }
    )?;
    writeln!(
        s,
        "  decoder: feature size {}, {} input channel(s), window {:?}",
        c.feature_size, v.in_channels, v.img_size
    )?;
    writeln!(
        s,
        "  reference forward on one window needs {:.1} MiB of scratch",
        scratch as f64 * 4.0 / (1 << 20) as f64
    )?;
    // Which kernels `segment` runs here: the CPU decides speed, never accuracy (f32 arithmetic
    // either way; integer products only with --int8-kernels on an int8 file).
    let k = fast::KernelTable::detect();
    let f32_set = match k.f32.isa() {
        fast::Isa::Avx512 => "AVX-512 (GEMM micro-kernel) and AVX2 + FMA",
        fast::Isa::Avx2Fma => "AVX2 + FMA",
        fast::Isa::Neon => "NEON",
        fast::Isa::Scalar => "portable",
    };

    let int8_set = match k.int8.qisa() {
        fast::QIsa::Vnni => "AVX-512 VNNI",
        fast::QIsa::Neon => "NEON",
        fast::QIsa::Scalar => "portable",
    };
    writeln!(s, "  kernels on this CPU: f32 {f32_set}; int8 (with --int8-kernels) {int8_set}")?;
    writeln!(s, "preprocessing:")?;
    writeln!(
        s,
        "  orientation {}, spacing {:?} mm, foreground crop {}",
        p.orientation, p.target_spacing, p.foreground_crop
    )?;
    let w = &p.intensity;
    writeln!(s, "  intensity [{}, {}] -> [{}, {}], clip {}", w.a_min, w.a_max, w.b_min, w.b_max, w.clip)?;
    writeln!(s, "classes ({}):", p.class_names.len())?;
    for (i, name) in p.class_names.iter().enumerate() {
        writeln!(s, "  {i:>3}  {name}")?;
    }
    Ok(s)
}

/// Sliding-window and output settings of a segmentation.
#[derive(Clone, Debug)]
pub struct SegmentOptions {
    /// Window overlap.
    pub overlap: f64,
    /// Window blending.
    pub blend: glmae_data::sliding_window::Blend,
    /// Threads: all working inside each window ([`Engine::Fast`]), or one window each
    /// ([`Engine::Reference`]).
    pub threads: usize,
    /// Also write per-class probabilities (channels = classes) here, one class at a time.
    pub probabilities: Option<std::path::PathBuf>,
    /// Store them as uint8 with `scl_slope` 1/255 (to 0.002, a quarter of float32's bytes)
    /// instead of float32.
    pub probabilities_u8: bool,
    /// Show a progress bar.
    pub progress: bool,
}

/// Which forward pass segments the windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    /// [`fast::FastUnetr`]: windows in turn, each split across `threads` cores; int8 weights are
    /// dequantised once at load and run on the f32 kernels (the reference's arithmetic, to 1e-4
    /// of the logit range).
    #[default]
    Fast,
    /// [`fast::FastUnetr`] with the int8 3x3x3 decoder convolutions that have 128+ input
    /// channels (or that Winograd F(4, 3) does not fit) on integer kernels (AVX-512 VNNI, else
    /// portable integer code), where they are the fastest: activations are quantised per tensor
    /// (12 bits after the F(2, 3) transform), a further approximation (labels 99.93% identical
    /// on the benchmark window; docs/performance.md), so it is opt-in.
    FastInt8Kernels,
    /// glmae-core's allocation-free reference kernels, one window per thread.
    Reference,
}

/// What a segmentation produced.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentSummary {
    /// Voxels per class on the source grid.
    pub counts: Vec<usize>,
    /// Windows run.
    pub windows: usize,
}

/// Segments `input` with `model` and writes the label map to `output` on the input's grid, with
/// its affine and codes, as uint8. Nothing is written on error. Runs [`Engine::Fast`].
pub fn segment_file(
    model: &ModelFile<'_>,
    input: &Path,
    output: &Path,
    opts: &SegmentOptions,
) -> Result<SegmentSummary> {
    segment_file_with(model, input, output, opts, Engine::Fast)
}

/// Logits `(classes, shape)` for a preprocessed volume `(channels, shape)`, sliding-window.
pub fn segment_volume(
    model: &ModelFile<'_>,
    volume: &[f32],
    shape: [usize; 3],
    opts: &SegmentOptions,
    engine: Engine,
) -> Result<Vec<f32>> {
    use glmae_data::sliding_window::{WindowSpec, sliding_window_into, sliding_window_parallel};
    let channels = model.config.vit.in_channels as usize;
    let roi = model.config.vit.img_size.map(|s| s as usize);
    let classes = model.config.out_channels as usize;
    let spec = WindowSpec { roi, overlap: opts.overlap, blend: opts.blend };
    let bar = if opts.progress { indicatif::ProgressBar::new(0) } else { indicatif::ProgressBar::hidden() };
    let logits = match engine {
        Engine::Fast | Engine::FastInt8Kernels => {
            let mut fast = fast::FastUnetr::new(model)?;
            if engine == Engine::FastInt8Kernels {
                // The table's int8 set: VNNI where the CPU has it, else portable.
                let q = fast.kernels().int8.qisa();
                fast = fast.with_int8_kernels(Some(q))?;
            }
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(opts.threads.max(1))
                .build()
                .context("cannot start the worker threads")?;
            let total = glmae_data::sliding_window::window_count(shape, &spec);
            bar.set_length(total as u64);
            // One window at a time, all threads inside it: memory stays at one window's worth.
            pool.install(|| {
                sliding_window_into(volume, channels, shape, &spec, classes, |w, out| {
                    fast.forward_into(w, roi, out)?;
                    bar.inc(1);
                    Ok(())
                })
            })?
        }
        Engine::Reference => {
            let unetr = Unetr::new(model)?;
            let scratch_len = unetr.scratch_len(roi)?;
            sliding_window_parallel(
                volume,
                channels,
                shape,
                &spec,
                classes,
                opts.threads,
                |w| {
                    let mut out = vec![0.0; unetr.logits_len(roi)];
                    let mut scratch = vec![0.0; scratch_len];
                    unetr.forward(w, roi, &mut out, &mut scratch)?;
                    Ok(out)
                },
                |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                },
            )?
        }
    };
    bar.finish_and_clear();
    Ok(logits)
}

/// [`segment_file`] on a chosen [`Engine`].
pub fn segment_file_with(
    model: &ModelFile<'_>,
    input: &Path,
    output: &Path,
    opts: &SegmentOptions,
    engine: Engine,
) -> Result<SegmentSummary> {
    use glmae_data::nifti_io::LabelType;
    ensure_outputs_apart(input, output, opts)?;
    let glmae_data::NiftiImage { volume, meta } = glmae_data::read_nifti(input)?;
    let name = input.display().to_string();
    let (labels, summary) = segment_source(model, volume, &name, &meta, opts, engine)?;
    // Classes are capped at 256 by the format, so labels always fit uint8.
    glmae_data::write_labels(output, &labels.data, labels.shape, &meta, LabelType::U8)?;
    Ok(summary)
}

/// A DICOM series segmented: the labels on the series' grid (voxel `(column, row, slice)`) and
/// the series they belong to.
pub struct DicomSegmentation {
    /// The labels, with the series' RAS affine.
    pub labels: glmae_data::Labels,
    /// The series.
    pub series: glmae_data::dicom::SeriesInfo,
    /// The slices in volume order (what a DICOM SEG references frame by frame).
    pub slices: Vec<glmae_data::dicom::SliceHeader>,
    /// Counts and windows.
    pub summary: SegmentSummary,
}

impl DicomSegmentation {
    /// The labels as uint8 NIfTI on the series' grid (what `dcm2niix` and nibabel give for it).
    pub fn write_nifti(&self, path: &Path) -> Result<()> {
        use glmae_data::nifti_io::{LabelType, StoredType, meta_for_affine};
        let meta = meta_for_affine(&self.labels.affine, StoredType::U8);
        glmae_data::write_labels(path, &self.labels.data, self.labels.shape, &meta, LabelType::U8)
    }

    /// The labels as a binary DICOM SEG referencing the series (one segment per class of
    /// `class_names`, background first: the model's classes), written atomically to `path`.
    pub fn write_seg(
        &self,
        path: &Path,
        class_names: &[String],
        opts: &glmae_data::dicom_seg::SegOptions,
    ) -> Result<()> {
        glmae_data::dicom_seg::write_seg(path, &self.seg_source(), &self.labels, class_names, opts)
    }

    /// [`Self::write_seg`]'s file bytes, for a caller that also sends them.
    pub fn encode_seg(
        &self,
        class_names: &[String],
        opts: &glmae_data::dicom_seg::SegOptions,
    ) -> Result<Vec<u8>> {
        glmae_data::dicom_seg::encode_seg(&self.seg_source(), &self.labels, class_names, opts)
    }

    /// What the SEG references: the series, its slices and their grid (the labels' own).
    fn seg_source(&self) -> glmae_data::dicom_seg::SegSource<'_> {
        glmae_data::dicom_seg::SegSource {
            series: &self.series,
            slices: &self.slices,
            shape: self.labels.shape,
            affine: self.labels.affine,
        }
    }
}

/// Segments the DICOM series in `dir` (the one with `series_uid`, or else the CT series with
/// the most slices; [`glmae_data::dicom`]): labels on the series' grid, in memory; write them
/// with [`DicomSegmentation::write_nifti`] or [`DicomSegmentation::write_seg`].
/// `opts.probabilities` is written as NIfTI on the same grid.
pub fn segment_dicom(
    model: &ModelFile<'_>,
    dir: &Path,
    series_uid: Option<&str>,
    opts: &SegmentOptions,
    engine: Engine,
) -> Result<DicomSegmentation> {
    use glmae_data::nifti_io::{StoredType, meta_for_affine};
    if let Some(p) = &opts.probabilities {
        glmae_data::io::ensure_not_input(dir, p)?;
    }
    let dicom = glmae_data::dicom::read_dicom_folder(dir, series_uid)?;
    let meta = meta_for_affine(&dicom.volume.affine, StoredType::F32);
    let name = format!("{} ({})", dir.display(), dicom.series.label());
    let glmae_data::dicom::DicomVolume { volume, series, slices } = dicom;
    let (labels, summary) = segment_source(model, volume, &name, &meta, opts, engine)?;
    Ok(DicomSegmentation { labels, series, slices, summary })
}

/// Refuses an output (or probabilities file) that is the input, or two outputs on one file.
pub fn ensure_outputs_apart(input: &Path, output: &Path, opts: &SegmentOptions) -> Result<()> {
    glmae_data::io::ensure_not_input(input, output)?;
    if let Some(p) = &opts.probabilities {
        glmae_data::io::ensure_not_input(input, p)?;
        anyhow::ensure!(
            p != output,
            "--probabilities and --output are both {}: they need two files",
            output.display()
        );
    }
    Ok(())
}

/// Preprocesses `volume` as the model says, runs the windows, and takes the labels back on the
/// source grid (softmax on the model grid, probabilities resampled as MONAI's Invertd, argmax
/// there); writes the probabilities too when asked, with `meta`'s grid. `name` names the input
/// in errors.
fn segment_source(
    model: &ModelFile<'_>,
    volume: glmae_data::Volume,
    name: &str,
    meta: &glmae_data::nifti_io::NiftiMeta,
    opts: &SegmentOptions,
    engine: Engine,
) -> Result<(glmae_data::Labels, SegmentSummary)> {
    use glmae_data::preprocess::Preprocessor;
    use glmae_data::sliding_window::{WindowSpec, window_count};
    let channels = model.config.vit.in_channels as usize;
    anyhow::ensure!(
        volume.channels == channels,
        "{name}: {} channel(s), the model expects {channels}",
        volume.channels
    );
    let prep = Preprocessor::from_model(&model.preprocessing);
    // The source volume is handed over (reoriented in place, then freed): only its grid is
    // needed to write the results back.
    let (source_shape, source_affine) = (volume.shape, volume.affine);
    let (vol, inverse) = prep.apply_owned(volume).with_context(|| name.to_string())?;
    let roi = model.config.vit.img_size.map(|s| s as usize);
    let classes = model.config.out_channels as usize;
    let spec = WindowSpec { roi, overlap: opts.overlap, blend: opts.blend };
    let windows = window_count(vol.shape, &spec);
    let windows_at_half = window_count(vol.shape, &WindowSpec { overlap: 0.5, ..spec });
    if opts.progress && windows > 8 * windows_at_half {
        // A high overlap multiplies the windows by about (1 - 0.5)^3 / (1 - overlap)^3.
        eprintln!(
            "note: {name}: overlap {} means {windows} windows (overlap 0.5: {windows_at_half}); this will take a while",
            opts.overlap,
        );
    }
    let logits =
        segment_volume(model, &vol.data, vol.shape, opts, engine).with_context(|| name.to_string())?;
    // MONAI's bundles: softmax on the model grid, probabilities back to the source grid
    // (trilinear, Invertd), argmax there. The logits' buffer becomes the probabilities'.
    let n = vol.voxels();
    let mut probs = logits;
    let mut column = vec![0.0f32; classes];
    for v in 0..n {
        for (c, x) in column.iter_mut().enumerate() {
            *x = probs[c * n + v];
        }
        glmae_core::kernels::softmax_in_place(&mut column);
        for (c, &x) in column.iter().enumerate() {
            probs[c * n + v] = x;
        }
    }
    let source = inverse.argmax_to_source(&probs, classes, opts.threads.max(1))?;
    if let Some(p) = &opts.probabilities {
        // One class on the source grid at a time: memory grows by one class, not by all of them.
        use glmae_data::nifti_io::{ChannelWriter, StoredType};
        let (stored, slope) =
            if opts.probabilities_u8 { (StoredType::U8, 1.0 / 255.0) } else { (StoredType::F32, 1.0) };
        let mut w = ChannelWriter::create(p, source_shape, classes, meta, stored, slope)?;
        for c in 0..classes {
            w.write_channel(&inverse.class_to_source(&probs, classes, c)?)?;
        }
        w.finish()?;
    }
    let mut counts = vec![0usize; classes];
    for &l in &source {
        counts[l as usize] += 1;
    }
    Ok((glmae_data::Volume::new(source, source_shape, source_affine), SegmentSummary { counts, windows }))
}
