//! What a running job shows: an indicatif bar on a terminal (items, rate, ETA, refused and
//! skipped so far), plain lines every few seconds otherwise (logs, CI), nothing when hidden.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Default)]
struct Counters {
    done: AtomicU64,
    indexed: AtomicU64,
    skipped: AtomicU64,
    refused: AtomicU64,
    retries: AtomicU64,
}

/// The counters of a job and their display.
pub struct Progress {
    total: u64,
    counters: Arc<Counters>,
    bar: Option<ProgressBar>,
    stop_lines: Arc<AtomicBool>,
    lines: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// A bar when stderr is a terminal, else a plain line every `every`.
    pub fn on_stderr(total: u64, what: &'static str, every: Duration) -> Self {
        Self::drawn(total, what, every, line)
    }

    /// As `on_stderr`, for work that is not items to index (queries): count with `done`.
    pub fn steps_on_stderr(total: u64, what: &'static str, every: Duration) -> Self {
        Self::drawn(total, what, every, steps_line)
    }

    fn drawn(total: u64, what: &'static str, every: Duration, line: fn(&Counters, u64, Duration) -> String) -> Self {
        let mut progress = Self::hidden(total);
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{wide_bar}] {human_pos}/{human_len} {per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            progress.bar = Some(bar);
        } else {
            let (counters, stop) = (progress.counters.clone(), progress.stop_lines.clone());
            let started = Instant::now();
            progress.lines = Some(std::thread::spawn(move || {
                let mut last = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(100));
                    if last.elapsed() >= every {
                        last = Instant::now();
                        eprintln!("{what}: {}", line(&counters, total, started.elapsed()));
                    }
                }
            }));
        }
        progress
    }

    /// Counters only.
    pub fn hidden(total: u64) -> Self {
        Self { total, counters: Arc::default(), bar: None, stop_lines: Arc::default(), lines: None }
    }

    fn advance(&self, counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
        self.counters.done.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
            let (refused, skipped) =
                (self.counters.refused.load(Ordering::Relaxed), self.counters.skipped.load(Ordering::Relaxed));
            if refused + skipped > 0 {
                bar.set_message(format!("{refused} refused, {skipped} already there"));
            }
        }
    }

    /// Steps done, of a `steps_on_stderr` display.
    pub fn done(&self, n: u64) {
        self.counters.done.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    pub fn indexed(&self, n: u64) {
        self.advance(&self.counters.indexed, n);
    }

    pub fn skipped(&self, n: u64) {
        self.advance(&self.counters.skipped, n);
    }

    pub fn refused(&self, n: u64) {
        self.advance(&self.counters.refused, n);
    }

    pub fn retried(&self) {
        self.counters.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retries(&self) -> u64 {
        self.counters.retries.load(Ordering::Relaxed)
    }

    /// Items acknowledged as indexed, and items skipped as already there.
    pub fn indexed_and_skipped(&self) -> (u64, u64) {
        (self.counters.indexed.load(Ordering::Relaxed), self.counters.skipped.load(Ordering::Relaxed))
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Stops the display (the bar stays on screen as it ended).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
        self.stop_lines.store(true, Ordering::Release);
        if let Some(lines) = self.lines.take() {
            let _ = lines.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

fn steps_line(c: &Counters, total: u64, elapsed: Duration) -> String {
    let done = c.done.load(Ordering::Relaxed);
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    format!("{done}/{total} ({:.0}%), {rate:.1}/s", 100.0 * done as f64 / total.max(1) as f64)
}

fn line(c: &Counters, total: u64, elapsed: Duration) -> String {
    let done = c.done.load(Ordering::Relaxed);
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let eta = if rate > 0.0 { format!("{:.0} s", total.saturating_sub(done) as f64 / rate) } else { "?".into() };
    format!(
        "{done}/{total} items ({:.0}%), {rate:.0} items/s, ETA {eta}; {} indexed, {} already there, {} refused, {} retries",
        100.0 * done as f64 / total.max(1) as f64,
        c.indexed.load(Ordering::Relaxed),
        c.skipped.load(Ordering::Relaxed),
        c.refused.load(Ordering::Relaxed),
        c.retries.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_up_and_the_line_says_so() {
        let progress = Progress::hidden(10);
        progress.indexed(4);
        progress.skipped(3);
        progress.refused(1);
        progress.retried();
        let text = line(&progress.counters, 10, Duration::from_secs(4));
        assert_eq!(text, "8/10 items (80%), 2 items/s, ETA 1 s; 4 indexed, 3 already there, 1 refused, 1 retries");
    }
}
