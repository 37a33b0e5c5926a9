//! The position file of `restore --follow` on hostile text.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = walsync::follow::parse_position(text, std::path::Path::new("x.walsync-follow"), "app");
});
