//! The segment decoder on hostile bytes: refused, never a panic, never an
//! allocation the bytes do not justify.
#![no_main]
use libfuzzer_sys::fuzz_target;
use walsync::segment::{PageReader, verify};

fuzz_target!(|data: &[u8]| {
    let _ = verify(data, data.len() as u64);
    if let Ok(mut reader) = PageReader::new(data, data.len() as u64, None) {
        // The decoder refuses page sizes outside 512..=65536.
        let mut page = vec![0u8; reader.header().page_size as usize];
        while let Ok(Some(_)) = reader.next_page(&mut page) {}
    }
});
