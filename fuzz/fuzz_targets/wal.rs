//! The WAL reader on hostile files: a header, then a scan of the frames.
#![no_main]
use std::io::Write;

use libfuzzer_sys::fuzz_target;
use walsync::wal::{self, WalHeader};

fuzz_target!(|data: &[u8]| {
    let _ = WalHeader::parse(data);
    let mut file = tempfile::tempfile().expect("a temp file");
    file.write_all(data).expect("written");
    if let Ok(Some(header)) = WalHeader::read_from(&file) {
        if let Ok(scan) = wal::scan(&file, &header, header.start()) {
            let _ = scan;
        }
    }
});
