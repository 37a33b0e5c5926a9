//! What a command prints on stdout.
//!
//! A reader that goes away (`walsync list | head -1`) must not turn into a
//! panic: the first failed write ends the output quietly, and the command
//! still finishes its work (a `restore-all` whose log reader died still
//! restores every database) and exits with that work's status.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `args` to stdout unless stdout has been closed.
pub fn write(args: fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let written = crate::progress::out_of_the_way(|| {
        let mut stdout = io::stdout().lock();
        stdout.write_fmt(args).and_then(|()| stdout.flush())
    });
    if let Err(e) = written {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe {
            tracing::warn!(error = %e, "standard output failed; the rest of the output is dropped");
        }
    }
}

/// `print!` that ends quietly when stdout is closed.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::out::write(format_args!($($arg)*)) };
}

/// `println!` that ends quietly when stdout is closed.
#[macro_export]
macro_rules! sayln {
    () => { $crate::out::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out::write(format_args!("{}\n", format_args!($($arg)*))) };
}
