//! An object body being built: kept in memory while small, moved to an
//! anonymous temp file once large, so a multi-GB snapshot never sits in RAM.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};

/// Bodies above this size go to a temp file (and up to S3 as multipart).
pub const SPOOL_MEMORY_LIMIT: usize = 8 * 1024 * 1024;

/// A finished object body, ready to upload.
#[derive(Debug)]
pub enum Payload {
    Bytes(Vec<u8>),
    /// A temp file positioned anywhere; `len` bytes from its start are the body.
    File {
        file: File,
        len: u64,
    },
}

impl Payload {
    pub fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A second handle on the same body, so a failed upload can be retried
    /// with exactly the same bytes, or the body written to two stores at
    /// once. Backends read a file body from its start through [`FileBody`]
    /// (or positioned reads of their own), never through the shared offset.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Payload::Bytes(b) => Payload::Bytes(b.clone()),
            Payload::File { file, len } => Payload::File {
                file: file.try_clone()?,
                len: *len,
            },
        })
    }
}

/// Reads a spooled body from its start at explicit positions, never through
/// the file's offset: every handle [`Payload::try_clone`] makes shares that
/// offset, and a body written to two stores at once is read by both.
pub struct FileBody<'a> {
    file: &'a File,
    pos: u64,
    len: u64,
}

impl<'a> FileBody<'a> {
    pub fn new(file: &'a File, len: u64) -> Self {
        Self { file, pos: 0, len }
    }
}

impl io::Read for FileBody<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = std::os::unix::fs::FileExt::read_at(self.file, &mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A `Write` sink that becomes a [`Payload`].
#[derive(Debug)]
pub struct SpoolWriter {
    memory: Vec<u8>,
    file: Option<File>,
    len: u64,
}

impl Default for SpoolWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl SpoolWriter {
    pub fn new() -> Self {
        Self {
            memory: Vec::new(),
            file: None,
            len: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> io::Result<Payload> {
        match self.file {
            None => Ok(Payload::Bytes(self.memory)),
            Some(mut file) => {
                file.flush()?;
                file.seek(SeekFrom::Start(0))?;
                Ok(Payload::File {
                    file,
                    len: self.len,
                })
            }
        }
    }
}

impl Write for SpoolWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.file.is_none() && self.memory.len() + buf.len() > SPOOL_MEMORY_LIMIT {
            let mut file = tempfile::tempfile()?;
            file.write_all(&self.memory)?;
            self.memory = Vec::new();
            self.file = Some(file);
        }
        match &mut self.file {
            Some(file) => file.write_all(buf)?,
            None => self.memory.extend_from_slice(buf),
        }
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn small_stays_in_memory_large_goes_to_file() {
        let mut w = SpoolWriter::new();
        w.write_all(b"hello").unwrap();
        assert!(matches!(w.finish().unwrap(), Payload::Bytes(b) if b == b"hello"));

        let mut w = SpoolWriter::new();
        let chunk = vec![7u8; 1024 * 1024];
        for _ in 0..9 {
            w.write_all(&chunk).unwrap();
        }
        match w.finish().unwrap() {
            Payload::File { mut file, len } => {
                assert_eq!(len, 9 * 1024 * 1024);
                let mut all = Vec::new();
                file.read_to_end(&mut all).unwrap();
                assert_eq!(all.len() as u64, len);
                assert!(all.iter().all(|b| *b == 7));
            }
            Payload::Bytes(_) => panic!("expected a file"),
        }
    }
}
