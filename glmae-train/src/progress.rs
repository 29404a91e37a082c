//! The progress bars every long stage shows: one style, a label naming the stage.
//!
//! On a terminal the bar redraws in place. When stderr is a file or a pipe (a job's log, `nohup`,
//! CI), indicatif would draw nothing at all; there the bar's line is written to stderr as plain
//! text at most every [`LOG_EVERY`], so a log still shows how far a run is and how fast it goes.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// How often a bar writes a line when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// A bar of `len` steps labelled `label`, drawn to stderr: in place on a terminal, as a line
/// every [`LOG_EVERY`] otherwise.
pub fn bar(label: &str, len: u64) -> ProgressBar {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(len)
    } else {
        ProgressBar::with_draw_target(
            Some(len),
            ProgressDrawTarget::term_like_with_hz(Box::new(LogLines::new()), 1),
        )
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// A terminal stand-in for logs: collects what indicatif draws and writes it to stderr as one
/// line, the first draw at once and then at most every [`LOG_EVERY`]; cursor moves are ignored.
#[derive(Debug)]
struct LogLines {
    state: Mutex<(String, Option<Instant>)>,
}

impl LogLines {
    fn new() -> Self {
        Self { state: Mutex::new((String::new(), None)) }
    }

    fn push(&self, s: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.0.push_str(s);
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        160
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.push(s);
        self.push(" ");
        Ok(())
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.push(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let due = state.1.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        let line = std::mem::take(&mut state.0);
        let line = line.trim();
        if due && !line.is_empty() {
            state.1 = Some(Instant::now());
            let mut err = std::io::stderr().lock();
            writeln!(err, "{line}")?;
        }
        Ok(())
    }
}
