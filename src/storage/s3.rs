//! S3 storage (placeholder while the real backend is written).
use super::{Error, ObjectMeta, ObjectReader, Payload, Result, S3Options, Storage};
use async_trait::async_trait;
#[derive(Debug)]
pub struct S3Storage;
impl S3Storage {
    pub async fn connect(_bucket: &str, _prefix: &str, _opts: &S3Options) -> Result<Self> {
        Err(Error::S3 {
            op: "connect",
            key: String::new(),
            message: "not built yet".into(),
        })
    }
}
#[async_trait]
impl Storage for S3Storage {
    async fn put_new(&self, _: &str, _: Payload, _: [u8; 32]) -> Result<()> {
        unimplemented!()
    }
    async fn get(&self, _: &str) -> Result<ObjectReader> {
        unimplemented!()
    }
    async fn list(&self, _: &str) -> Result<Vec<ObjectMeta>> {
        unimplemented!()
    }
    async fn delete(&self, _: &str) -> Result<()> {
        unimplemented!()
    }
    fn describe(&self) -> String {
        String::new()
    }
}
