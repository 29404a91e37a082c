//! The quickstart's every stage runs at the tiny scale and leaves each promised result behind.

#[test]
fn tiny_quickstart_produces_every_result() {
    let out = std::env::temp_dir().join(format!("glmae-qs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let device = burn::tensor::Device::flex().autodiff();
    let s = glmae_train::quickstart::quickstart(&out, glmae_train::quickstart::QuickstartScale::Tiny, device)
        .unwrap();
    for p in [
        s.data.join("dataset.json"),
        s.pretrain.join("loss.png"),
        s.pretrain.join("checkpoint.bin"),
        s.finetune.join("best.bin"),
        s.finetune.join("loss.png"),
        s.finetune.join("validation.png"),
        s.eval.join("dice.md"),
        s.eval.join("dice.csv"),
        s.model.clone(),
        s.segmentation.clone(),
    ] {
        assert!(p.is_file(), "{} is missing", p.display());
    }
    assert!((0.0..=1.0).contains(&s.mean_dice));
    let seg = glmae_data::read_nifti(&s.segmentation).unwrap();
    let src = glmae_data::read_nifti(
        &glmae_data::Dataset::from_json(&s.data.join("dataset.json")).unwrap().validation[0].image,
    )
    .unwrap();
    assert_eq!((seg.volume.shape, seg.volume.affine), (src.volume.shape, src.volume.affine));
    std::fs::remove_dir_all(&out).unwrap();
}
