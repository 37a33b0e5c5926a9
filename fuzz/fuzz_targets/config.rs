//! The walsync.toml parser on hostile text. Paths are made to point into an
//! empty directory, so that a pattern cannot make the run walk the disk.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("**") || text.contains("recursive") {
        return;
    }
    let _ = walsync::config::Config::parse(text, std::path::Path::new("/nonexistent-walsync-fuzz/walsync.toml"));
});
