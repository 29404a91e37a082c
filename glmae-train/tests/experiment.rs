//! The ablation at the tiny scale: every arm and seed has a result, summary.md states the mean and
//! standard deviation of results.csv, and a rerun into the same folder reuses every stage.

use glmae_train::experiment::{Arm, ExperimentScale, Plan, ablation, mean_std};

#[test]
fn tiny_ablation_reports_every_arm_and_seed() {
    let out = std::env::temp_dir().join(format!("glmae-ablation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let device = burn::tensor::Device::flex().autodiff();
    let plan = Plan::new(ExperimentScale::Tiny, 2);
    let s = ablation(&out, &plan, device.clone()).unwrap();
    assert_eq!(s.results.len(), 8);

    // results.csv: one row per arm and seed, 13 classes and the mean.
    let csv = std::fs::read_to_string(&s.csv).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!((header[0], header[1], header.len(), header[15]), ("arm", "seed", 16, "mean"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let mut by_arm = std::collections::BTreeMap::<&str, Vec<f64>>::new();
    for r in &rows {
        assert_eq!(r.len(), 16, "{r:?}");
        let mean: f64 = r[15].parse().unwrap();
        assert!((0.0..=1.0).contains(&mean));
        by_arm.entry(r[0]).or_default().push(mean);
    }
    for arm in Arm::ALL {
        let seeds: Vec<&str> = rows.iter().filter(|r| r[0] == arm.name()).map(|r| r[1]).collect();
        assert_eq!(seeds, ["0", "1"], "{}", arm.name());
    }

    // summary.md's first table: `| arm | seeds | mean ± std | per seed |`, in percent.
    let md = std::fs::read_to_string(&s.markdown).unwrap();
    for arm in Arm::ALL {
        let row = md
            .lines()
            .find(|l| l.starts_with(&format!("| {} | ", arm.name())))
            .unwrap_or_else(|| panic!("no row for {} in\n{md}", arm.name()));
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        assert_eq!(cells[2], "2");
        let (m, sd) = cells[3].split_once('±').unwrap();
        let (want_m, want_sd) = mean_std(&by_arm[arm.name()]);
        let close =
            |text: &str, want: f64| (text.trim().parse::<f64>().unwrap() - 100.0 * want).abs() <= 0.006;
        assert!(close(m, want_m), "{row}: mean should be {}", 100.0 * want_m);
        assert!(close(sd, want_sd.unwrap()), "{row}: std should be {}", 100.0 * want_sd.unwrap());
    }
    for stage in ["pretraining full", "fine-tuning scratch", "evaluation global-local"] {
        assert!(md.contains(&format!("| {stage} |")), "{stage} missing from\n{md}");
    }

    // A rerun finds every result and recomputes nothing: the files stay byte-identical.
    let again = ablation(&out, &plan, device.clone()).unwrap();
    assert_eq!(std::fs::read_to_string(&again.csv).unwrap(), csv);
    // Another plan in the same folder is refused.
    let other = Plan { finetune_steps: 3, ..plan };
    let e = ablation(&out, &other, device).unwrap_err().to_string();
    assert!(e.contains("another plan"), "{e}");
    std::fs::remove_dir_all(&out).unwrap();
}
