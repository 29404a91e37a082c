//! UNETR fine-tuning on tiny configurations: the DiceCE loss, label fractions, frozen encoders,
//! learning on phantoms, validation and export to the core format.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use glmae_core::format::Precision;
use glmae_data::phantom::PhantomConfig;
use glmae_data::phantom_dataset::write_phantom_dataset;
use glmae_data::transforms::Rng;
use glmae_data::{Case, VolumeCache};
use glmae_train::finetune::crops::label_subset;
use glmae_train::finetune::loss::dice_ce;
use glmae_train::finetune::train::{TrainOptions, train};
use glmae_train::finetune::{FinetuneConfig, Finetuner};

fn device() -> Device {
    Device::flex().autodiff()
}

#[test]
fn dice_ce_matches_a_hand_computation() {
    // One crop, 2 classes, 2 voxels: logits (0, 1) and (2, 0); labels 1 and 0.
    let d = device();
    let logits = Tensor::<5>::from_data(TensorData::new(vec![0.0f32, 2.0, 1.0, 0.0], [1, 2, 1, 1, 2]), &d);
    let onehot = Tensor::<5>::from_data(TensorData::new(vec![0.0f32, 1.0, 1.0, 0.0], [1, 2, 1, 1, 2]), &d);
    let (dice, ce) = dice_ce(logits, onehot);
    let s = |a: f64, b: f64| (a.exp() / (a.exp() + b.exp()), b.exp() / (a.exp() + b.exp()));
    let (p0a, p1a) = s(0.0, 1.0);
    let (p0b, p1b) = s(2.0, 0.0);
    let dice0 = 1.0 - 2.0 * p0b / (p0a * p0a + p0b * p0b + 1.0 + 1e-6);
    let dice1 = 1.0 - 2.0 * p1a / (p1a * p1a + p1b * p1b + 1.0 + 1e-6);
    let ce_expected = -(p1a.ln() + p0b.ln()) / 2.0;
    assert!((dice.into_scalar::<f32>() as f64 - (dice0 + dice1) / 2.0).abs() < 1e-5);
    assert!((ce.into_scalar::<f32>() as f64 - ce_expected).abs() < 1e-5);
}

#[test]
fn label_fraction_is_a_seeded_subset() {
    let cases: Vec<Case> = (0..8).map(|i| Case { image: format!("{i}.nii").into(), label: None }).collect();
    let a = label_subset(&cases, 0.25, 1);
    assert_eq!(a.len(), 2);
    assert_eq!(a, label_subset(&cases, 0.25, 1));
    assert_ne!(a, label_subset(&cases, 0.25, 2));
    assert_eq!(label_subset(&cases, 0.01, 1).len(), 1);
}

fn tiny(classes: usize) -> FinetuneConfig {
    let mut u = glmae_core::testing_config();
    u.out_channels = classes as u32;
    let mut c = FinetuneConfig::new(
        u,
        glmae_data::phantom::LABELS.iter().take(classes).map(std::string::ToString::to_string).collect(),
    );
    c.preprocessing.spacing = [6.0, 6.0, 6.0];
    c.crops_per_step = 2;
    c.steps = 30;
    c.warmup_steps = 3;
    c.lr = 3e-3;
    c
}

fn params(m: &impl Module) -> Vec<Vec<f32>> {
    struct C(Vec<Vec<f32>>);
    impl ModuleVisitor for C {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            self.0.push(p.val().to_data().try_to_vec::<f32>().unwrap());
        }
    }
    let mut c = C(Vec::new());
    m.visit(&mut c);
    c.0
}

#[test]
fn fine_tuning_learns_validates_and_exports() {
    let root = std::env::temp_dir().join(format!("glmae-ft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let ds = write_phantom_dataset(
        &root.join("data"),
        3,
        0,
        &PhantomConfig { shape: [64, 52, 40], spacing: [5.0, 5.0, 6.0] },
        2,
    )
    .unwrap();
    let cfg = tiny(14);
    let cache = VolumeCache::new(cfg.preprocessing.clone(), None);
    cache.warm(&ds.training, 2).unwrap();

    let mut frozen_cfg = cfg.clone();
    frozen_cfg.freeze_encoder = true;
    let mut frozen = Finetuner::new(frozen_cfg, device()).unwrap();
    let (enc0, dec0) = (params(&frozen.model.vit), params(&frozen.model.out));
    let p = cache.get(&ds.training[0]).unwrap();
    let (imgs, labs) = frozen.crops(&p.image, p.labels.as_ref().unwrap(), &mut Rng::new(0));
    frozen.step(imgs, &labs);
    assert_eq!(params(&frozen.model.vit), enc0, "a frozen encoder changed");
    assert_ne!(params(&frozen.model.out), dec0, "the decoder did not train");

    let mut ft = Finetuner::new(cfg.clone(), device()).unwrap();
    let mut losses = Vec::new();
    for step in 0..cfg.steps {
        let mut rng = Rng::for_item(cfg.seed, step as u64);
        let case = &ds.training[rng.below(ds.training.len())];
        let p = cache.get(case).unwrap();
        let (imgs, labs) = ft.crops(&p.image, p.labels.as_ref().unwrap(), &mut rng);
        losses.push(ft.step(imgs, &labs).loss);
    }
    let first = losses[..5].iter().sum::<f64>() / 5.0;
    let last = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    eprintln!("DiceCE: first 5 steps {first:.3}, last 5 steps {last:.3}");
    assert!(last < first, "fine-tuning loss did not fall: {first} -> {last}");

    let (mean, per_case) = ft.validate(&cache, &ds.validation).unwrap();
    assert_eq!(per_case.len(), 1);
    assert!((0.0..=1.0).contains(&mean));

    // Saved, reloaded and exported, the model segments like the burn one.
    ft.save(&root, "best").unwrap();
    let reloaded = Finetuner::load(&root, "best", device()).unwrap();
    let bytes = reloaded.export(Precision::F32).unwrap();
    let file = glmae_core::ModelFile::parse(&bytes).unwrap();
    assert_eq!(file.preprocessing.class_names.iter().nth(6), Some("liver"));
    let core = glmae_core::Unetr::new(&file).unwrap();
    let v = &cache.get(&ds.validation[0]).unwrap().image;
    let roi = cfg.roi();
    let k = 14;
    let logits = glmae_data::sliding_window::sliding_window(&v.data, 1, v.shape, &cfg.window(), k, |w| {
        let mut out = vec![0.0; k * roi.iter().product::<usize>()];
        let mut scratch = vec![0.0; core.scratch_len(roi)?];
        core.forward(w, roi, &mut out, &mut scratch)?;
        Ok(out)
    })
    .unwrap();
    let mut core_labels = vec![0u8; v.voxels()];
    glmae_core::kernels::argmax_channels(&logits, k, &mut core_labels);
    let burn_labels = reloaded.predict(v).unwrap();
    let agree =
        core_labels.iter().zip(&burn_labels).filter(|(a, b)| a == b).count() as f64 / v.voxels() as f64;
    assert!(agree > 0.999, "core and burn labels agree on only {agree}");

    // `finetune --init model.glmae`: the run takes the file's architecture, preprocessing and
    // class names, starts from every one of its weights, and trains them.
    let path = root.join("model.glmae");
    std::fs::write(&path, &bytes).unwrap();
    let from_file = FinetuneConfig::from_model_file(&path).unwrap();
    assert_eq!(from_file.unetr, cfg.unetr);
    assert_eq!(from_file.preprocessing.spacing, cfg.preprocessing.spacing);
    assert_eq!(from_file.class_names, cfg.class_names);
    let mut continued = Finetuner::new(from_file, device()).unwrap();
    assert_eq!(params(&continued.model), params(&reloaded.model), "weights changed on the way in");
    let (imgs, labs) = continued.crops(&p.image, p.labels.as_ref().unwrap(), &mut Rng::new(1));
    continued.step(imgs, &labs);
    assert_ne!(params(&continued.model.vit), params(&reloaded.model.vit), "the loaded encoder did not train");
    // A file whose UNETR differs from the run's is refused with its name.
    let mut other = cfg.clone();
    other.unetr.feature_size *= 2;
    other.init_from = Some(path.clone());
    let err = Finetuner::new(other, device()).err().expect("a mismatched model must be refused").to_string();
    assert!(err.contains("model.glmae"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Label maps with a value the model has no class for are refused before training, naming the
/// label file, the value and the class count (they used to train silently as the last class).
#[test]
fn label_values_beyond_the_classes_are_refused() {
    let root = std::env::temp_dir().join(format!("glmae-ft-labels-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let ds = write_phantom_dataset(
        &root.join("data"),
        3,
        0,
        &PhantomConfig { shape: [40, 36, 24], spacing: [6.0, 6.0, 6.0] },
        2,
    )
    .unwrap();
    // The phantoms carry all 13 organs: 14 classes fit, 5 do not.
    let cache = VolumeCache::new(tiny(14).preprocessing.clone(), None);
    glmae_train::finetune::crops::ensure_labels_fit(&cache, &ds.training, 14).unwrap();
    let mut ft = Finetuner::new(tiny(5), device()).unwrap();
    let opts = TrainOptions { loader_threads: 1, validate: true, progress_bar: true };
    let e = format!("{:#}", train(&mut ft, &ds, &root.join("run"), opts).unwrap_err());
    assert!(e.contains("label value") && e.contains("5 classes") && e.contains("label"), "{e}");
    let first_label = ds.training[0].label.as_ref().unwrap();
    assert!(e.contains(first_label.to_str().unwrap()), "the error does not name {first_label:?}: {e}");
    assert!(!root.join("run").join("last.bin").exists());
    std::fs::remove_dir_all(&root).unwrap();
}

/// `pretrain --model tiny` and `finetune --model tiny --init RUN` name one encoder: a tiny
/// pretraining run's encoder fits the tiny UNETR (as the command line combines them: the run's
/// encoder at the UNETR's window), and fine-tuning starts from its weights. The old `tiny`
/// pretraining preset (patch 4) made a UNETR that could not exist.
#[test]
fn tiny_pretraining_initialises_tiny_finetuning() {
    use glmae_train::pretrain::Pretrainer;
    use glmae_train::pretrain::run::RunDir;
    let root = std::env::temp_dir().join(format!("glmae-tiny-presets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let pre = glmae_train::presets::pretrain("tiny").unwrap();
    pre.validate().unwrap();
    let dir = RunDir::create(&root).unwrap();
    dir.save_config(&pre).unwrap();
    let run = Pretrainer::new(pre.clone(), device());
    dir.save_checkpoint(&run).unwrap();

    let mut unetr = glmae_train::presets::unetr("tiny", 3, 32).unwrap();
    unetr.vit = glmae_core::VitConfig { img_size: unetr.vit.img_size, ..dir.load_config().unwrap().encoder };
    unetr.validate().unwrap();
    let mut cfg = FinetuneConfig::new(unetr, vec!["background".into(), "a".into(), "b".into()]);
    cfg.init_from = Some(root.clone());
    let ft = Finetuner::new(cfg, device()).unwrap();
    // The patch embedding is the pretrained student's, not a fresh initialisation.
    let values = |t: Tensor<2>| t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let got = values(ft.model.vit.patch_embedding.patch_embeddings.weight.val());
    let want = values(run.student.vit.patch_embedding.patch_embeddings.weight.val());
    assert_eq!(got, want);
    std::fs::remove_dir_all(&root).unwrap();
}
