//! Progress of a long command, drawn on stderr while a person watches:
//! `restore` (bytes and objects), `restore-all` (databases, and the bytes
//! behind them), `verify` (databases). Only when stderr is a terminal and
//! the command was not given `--quiet`; otherwise every call is a no-op, so
//! scripts, pipes and logs see nothing but the results.
//!
//! One command runs per process, so the command installs its bar once and
//! the library reports into it wherever the work happens, without every
//! caller handing a bar through.

use std::cell::Cell;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};

static CURRENT: OnceLock<Progress> = OnceLock::new();

/// What the bar counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// Bytes downloaded (one restore).
    Bytes,
    /// Databases done; bytes are said beside them (restore-all, verify).
    Databases,
}

#[derive(Debug)]
pub struct Progress {
    /// Hidden until its style and length are set (else it draws once
    /// without them), then on stderr if `shown`.
    bar: ProgressBar,
    shown: bool,
    /// Drawn on the terminal: read without the bar's lock, which
    /// [`out_of_the_way`] holds while it prints.
    drawn: AtomicBool,
    unit: Unit,
    objects: AtomicU64,
    total_objects: AtomicU64,
    bytes: AtomicU64,
}

/// Runs `print` with the bar out of the way: cleared first, drawn again
/// after. Every line written to the terminal while a bar may be up goes
/// through here (log lines, results), or it is glued to the bar's text.
/// A call from inside `print` (a line printed while a report prints) just
/// prints: the bar is cleared already, and its lock, which the bar holds
/// while `print` runs, must not be asked for again (so nothing here asks
/// the bar anything before knowing it is not inside).
pub fn out_of_the_way<R>(print: impl FnOnce() -> R) -> R {
    thread_local!(static CLEARED: Cell<bool> = const { Cell::new(false) });
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CLEARED.set(false);
        }
    }
    // Not `current()`: a log line before the command installs its bar
    // must not install a hidden one in its place.
    if CLEARED.get() {
        return print();
    }
    match CURRENT.get() {
        Some(p) if p.drawn.load(Ordering::Relaxed) => {
            CLEARED.set(true);
            let _reset = Reset;
            p.bar.suspend(print)
        }
        _ => print(),
    }
}

/// The bar of this process: the one installed, else a hidden one.
pub fn current() -> &'static Progress {
    CURRENT.get_or_init(|| Progress::hidden(Unit::Bytes))
}

/// A bar for one restore's download, shown on a terminal unless `quiet`.
pub fn install_for_bytes(quiet: bool) {
    install(quiet, Unit::Bytes);
}

/// A bar for databases done, shown on a terminal unless `quiet`.
pub fn install_for_databases(quiet: bool, databases: u64, what: &str) {
    install(quiet, Unit::Databases);
    let p = current();
    p.bar.set_style(style(
        "{prefix} [{bar:30}] {pos}/{len} databases, {msg} ({elapsed}, ETA {eta})",
    ));
    p.bar.set_prefix(what.to_string());
    p.bar.set_message("0 objects");
    p.bar.set_length(databases);
    p.reveal();
}

fn install(quiet: bool, unit: Unit) {
    let progress = Progress {
        shown: !quiet && std::io::stderr().is_terminal(),
        ..Progress::hidden(unit)
    };
    let _ = CURRENT.set(progress);
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Progress {
    fn hidden(unit: Unit) -> Self {
        Self {
            bar: ProgressBar::hidden(),
            shown: false,
            drawn: AtomicBool::new(false),
            unit,
            objects: AtomicU64::new(0),
            total_objects: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// A restore of `prefix` will download `bytes` in `objects` objects. In
    /// restore-all, the objects of every database add up instead.
    pub fn planned(&self, prefix: &str, objects: usize, bytes: u64) {
        if self.unit == Unit::Databases {
            self.total_objects
                .fetch_add(objects as u64, Ordering::Relaxed);
        } else {
            // Planned again (an object went meanwhile): this plan replaces it.
            self.total_objects.store(objects as u64, Ordering::Relaxed);
            // The style first: a bar with a length is drawn at once.
            self.bar.set_style(style(
                "{prefix} [{bar:30}] {bytes}/{total_bytes}, {msg}, {binary_bytes_per_sec} (ETA {eta})",
            ));
            self.bar.set_prefix(format!("restoring {prefix}"));
            self.objects.store(0, Ordering::Relaxed);
            self.say_objects();
            self.bar.set_length(bytes);
            self.bar.set_position(0);
            self.reveal();
        }
    }

    /// One object downloaded and checked.
    pub fn fetched(&self, bytes: u64) {
        self.objects.fetch_add(1, Ordering::Relaxed);
        let total = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        match self.unit {
            Unit::Bytes => {
                self.say_objects();
                self.bar.inc(bytes);
            }
            Unit::Databases => self.say_bytes(total),
        }
    }

    /// One database of several done (restored, verified, or failed).
    pub fn database_done(&self) {
        if self.unit == Unit::Databases {
            self.bar.inc(1);
            self.say_bytes(self.bytes.load(Ordering::Relaxed));
        }
    }

    fn say_objects(&self) {
        self.bar.set_message(format!(
            "{}/{} objects",
            self.objects.load(Ordering::Relaxed),
            self.total_objects.load(Ordering::Relaxed)
        ));
    }

    fn say_bytes(&self, bytes: u64) {
        let secs = self.bar.elapsed().as_secs_f64().max(0.001);
        self.bar.set_message(format!(
            "{} objects, {} ({}/s)",
            self.objects.load(Ordering::Relaxed),
            HumanBytes(bytes),
            HumanBytes((bytes as f64 / secs) as u64)
        ));
    }

    fn reveal(&self) {
        if self.shown && !self.drawn.swap(true, Ordering::Relaxed) {
            self.bar
                .set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        }
    }

    /// The command is done: the bar goes, and the command's own lines
    /// (what it restored or found) take its place.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
