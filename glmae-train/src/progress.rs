//! The progress bars every long stage shows: one style, a label naming the stage.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps labelled `label`, drawn to stderr (hidden when stderr is not a terminal).
pub fn bar(label: &str, len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
